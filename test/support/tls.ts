import { execFile } from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { promisify } from "node:util"
import { Effect } from "effect"

/** The PEM file of a CA the test broker's certificate was not signed by, in a directory removed with the scope. */
export const otherCaFile = Effect.gen(function* () {
  const dir = yield* Effect.acquireRelease(
    Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-other-ca-"))),
    (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
  )
  const pem = Path.join(dir, "ca.pem")
  yield* Effect.promise(() =>
    promisify(execFile)("openssl", [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-days",
      "1",
      "-subj",
      "/CN=some other CA",
      "-keyout",
      Path.join(dir, "ca.key"),
      "-out",
      pem
    ])
  )
  return pem
})
