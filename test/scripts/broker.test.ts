import { spawn } from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Broker from "../../scripts/kafka/broker.ts"

const isAlive = (pid: number) => {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

/** A harmless long-lived process standing for "some other program that now has this PID". */
const otherProcess = Effect.acquireRelease(
  Effect.sync(() => spawn("sleep", ["300"], { stdio: "ignore" })),
  (child) => Effect.sync(() => child.kill("SIGKILL"))
)

describe("scripts/kafka/broker", () => {
  it.live("stop never signals a PID whose command line is not the broker of that directory", () =>
    Effect.gen(function* () {
      const child = yield* otherProcess
      const pid = child.pid ?? 0
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-stop-"))
      yield* Broker.stop({ pid, dir, ownsDir: true })
      assert.isTrue(isAlive(pid), "the unrelated process is still running")
      assert.isFalse(Fs.existsSync(dir), "a directory start created is removed")
    }).pipe(Effect.scoped)
  )

  it.live("stop keeps a directory the caller gave to start", () =>
    Effect.gen(function* () {
      const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-stop-"))
      yield* Broker.stop({ pid: 2 ** 22 + 1, dir, ownsDir: false })
      assert.isTrue(Fs.existsSync(dir))
      Fs.rmSync(dir, { recursive: true })
    })
  )

  it.effect("fromDir fails naming the directory when no broker was started there", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(Broker.fromDir("/nonexistent/kafka-effect"))
      assert.include(error.message, "/nonexistent/kafka-effect")
    })
  )
})
