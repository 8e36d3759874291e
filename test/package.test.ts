/**
 * The package as a user gets it: `npm pack` (which builds), the tarball installed into a new app beside the newest
 * effect 4.1.x, a program type-checked against the installed declarations and run, on the in-memory broker.
 */
import { execFile } from "node:child_process"
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { promisify } from "node:util"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"

const exec = promisify(execFile)
const root = Path.join(import.meta.dirname, "..")
const npm = (args: ReadonlyArray<string>, cwd: string) =>
  exec("npm", [...args, "--no-audit", "--no-fund", "--loglevel=error"], { cwd, maxBuffer: 64 * 1024 * 1024 })

const app = `import { Effect, Layer, Schema } from "effect"
import * as InMemoryKafka from "kafka-effect/InMemoryKafka"
import * as KafkaProducer from "kafka-effect/KafkaProducer"
import * as Processor from "kafka-effect/Processor"
import { Duration } from "effect"

const Order = Schema.Struct({ id: Schema.String, amount: Schema.Number })
const Orders = KafkaProducer.typedTopic("orders", Order)
const handlers = [
  Processor.handler({
    topic: "orders",
    value: Order,
    handle: ({ value }) => Effect.sync(() => console.log(\`charged \${value.id} \${value.amount}\`))
  })
]

const program = Effect.gen(function* () {
  yield* Processor.ensureTopics(handlers)
  const processor = yield* Processor.Processor
  yield* Effect.forkChild(processor.run(handlers))
  yield* Orders.send({ id: "o-1", amount: 12.5 }, { key: "ada" })
  while ((yield* processor.stats).done < 1) yield* Effect.sleep("10 millis")
}).pipe(Effect.scoped)

const Live = Processor.layer({
  consumer: { groupId: "app", workers: 2, maxInFlight: 100, fromBeginning: true, commitInterval: Duration.millis(50), shutdownTimeout: Duration.seconds(1) },
  retryTopicPrefix: "orders-retry",
  retryMax: 1,
  dlqTopic: "orders-dlq",
  createTopics: true
}).pipe(Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero })), Layer.provideMerge(InMemoryKafka.layer()))

Effect.runPromise(program.pipe(Effect.provide(Live))).then(() => process.exit(0))
`

describe("the package", () => {
  it.live(
    "packed, installed into an app beside the newest effect 4.1, it type-checks and runs",
    () =>
      Effect.promise(async () => {
        const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-app-"))
        try {
          const { stdout: packed } = await npm(["pack", "--pack-destination", dir], root)
          const tarball = Path.join(dir, packed.trim().split("\n").at(-1) ?? "")
          const listing = (await exec("tar", ["tzf", tarball])).stdout
          assert.include(listing, "package/dist/KafkaProducer.js", "built on pack")
          assert.include(listing, "package/LICENSE")
          assert.notInclude(listing, "package/test/")
          Fs.writeFileSync(
            Path.join(dir, "package.json"),
            JSON.stringify({ name: "an-app", private: true, type: "module" })
          )
          await npm(["install", tarball, "effect@~4.1", "@effect/platform-node@~4.1", "@types/node@24"], dir)
          const installed = JSON.parse(
            Fs.readFileSync(Path.join(dir, "node_modules", "effect", "package.json"), "utf8")
          ) as { version: string }
          assert.match(installed.version, /^4\.1\./)
          assert.isFalse(
            Fs.existsSync(Path.join(dir, "node_modules", "kafka-effect", "node_modules", "effect")),
            "one copy of effect: the app's"
          )
          Fs.writeFileSync(Path.join(dir, "app.ts"), app)
          Fs.writeFileSync(
            Path.join(dir, "tsconfig.json"),
            JSON.stringify({
              compilerOptions: {
                target: "ES2023",
                module: "NodeNext",
                moduleResolution: "NodeNext",
                strict: true,
                noEmit: true,
                allowImportingTsExtensions: true,
                types: ["node"]
              },
              include: ["app.ts"]
            })
          )
          await exec(process.execPath, [Path.join(root, "node_modules", "typescript", "bin", "tsc"), "-p", dir], {
            cwd: dir
          }).catch((error: { stdout?: string }) => {
            throw new Error(`the app does not type-check against the package:\n${error.stdout ?? String(error)}`)
          })
          const { stdout } = await exec(process.execPath, ["--experimental-strip-types", "--no-warnings", "app.ts"], {
            cwd: dir
          })
          assert.include(stdout, "charged o-1 12.5")
        } finally {
          Fs.rmSync(dir, { recursive: true, force: true })
        }
      }),
    240_000
  )
})
