/**
 * Start-up of `node dist/producer.js` and `node dist/consumer.js` with no broker to be had: their flags and
 * variables are checked before anything connects, and a signal while they wait for the broker stops them.
 */
import * as Fs from "node:fs"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Effect } from "effect"
import * as Program from "../scripts/program.ts"
import * as KafkaConfig from "../src/KafkaConfig.ts"
import { heapFlags, userChoseHeap } from "../src/programs/heap.ts"
import * as Help from "../src/programs/help.ts"

const producer = Path.join(Program.root, "src", "producer.ts")

// Nothing listens on port 1: connecting is refused at once, again and again.
const noBroker = { KAFKA_BROKERS: "127.0.0.1:1", KAFKA_RECONNECT_BACKOFF_MS: "100", LOG_FORMAT: "json" }

const run = (script: string, options: Parameters<typeof Program.run>[1]) =>
  Program.run(script, { timeout: 30_000, ...options })

// Each test starts Node processes (type stripping, module loading: about a second each here).
const timeout = 60_000

describe("the programs without a broker", () => {
  it.live(
    "bad variables stop start-up with exit 2, every problem named, before any attempt to connect",
    () =>
      Effect.gen(function* () {
        const result = yield* run(producer, {
          env: {
            ...noBroker,
            KAFKA_PRODUCER_ACKS: "bogus",
            KAFKA_CONSUMER_WORKERS: "0",
            KAFKA_TLS_CA_FILE: "/nonexistent/ca.pem"
          }
        })
        assert.strictEqual(result.exitCode, 2, result.stderr)
        assert.include(
          result.stderr,
          'KAFKA_PRODUCER_ACKS is "bogus"; expected all (or -1), 1 (or leader), 0 (or none)'
        )
        assert.include(result.stderr, 'KAFKA_CONSUMER_WORKERS is "0"; expected a whole number from 1 to 1024')
        assert.include(result.stderr, 'KAFKA_TLS_CA_FILE is "/nonexistent/ca.pem"; expected the path of a readable PEM')
        assert.notInclude(result.stderr, "not reachable")
      }),
    timeout
  )

  it.live(
    "a bad flag stops the consumer program with exit 2 and its usage; --help exits 0",
    () =>
      Effect.gen(function* () {
        const bad = yield* run(Program.consumerProgram, { args: ["--transient-failures", "2"], env: noBroker })
        assert.strictEqual(bad.exitCode, 2, bad.stderr)
        assert.include(bad.stderr, "--transient-failures must be a share from 0 to 1, got 2")
        assert.include(bad.stderr, "usage: node dist/consumer.js")
        for (const flag of ["--help", "-h"]) {
          const help = yield* run(producer, { args: [flag], env: noBroker })
          assert.strictEqual(help.exitCode, 0, help.stderr)
          assert.include(help.stdout, "usage: node dist/producer.js", "on stdout, for `| less`")
          assert.include(help.stdout, "--create-topic")
          assert.notInclude(help.stderr, "not reachable")
        }
      }),
    timeout
  )

  it.live(
    "flags that would be misread stop start-up: an empty count, a replay flag without replay, epoch seconds",
    () =>
      Effect.gen(function* () {
        // `--count ""` (an unset shell variable) was 0: generate until stopped.
        const emptyCount = yield* run(producer, { args: ["--count", ""], env: noBroker })
        assert.strictEqual(emptyCount.exitCode, 2, emptyCount.stderr)
        assert.include(emptyCount.stderr, '--count must be a whole number ≥ 0, got ""')
        // --dry-run without `replay` started the processor for real.
        const dryRun = yield* run(Program.consumerProgram, { args: ["--dry-run"], env: noBroker })
        assert.strictEqual(dryRun.exitCode, 2, dryRun.stderr)
        assert.include(dryRun.stderr, "--dry-run is not a flag of the processor (did you mean replay?)")
        // Epoch seconds, read as milliseconds, were January 1970: every dead letter replayed.
        const seconds = yield* run(Program.consumerProgram, {
          args: ["replay", "--since", "1700000000"],
          env: noBroker
        })
        assert.strictEqual(seconds.exitCode, 2, seconds.stderr)
        assert.include(seconds.stderr, "--since must be an ISO-8601 time")
        // --help is answered whatever the environment holds.
        const help = yield* run(producer, { args: ["--help"], env: { ...noBroker, LOG_LEVEL: "verbose" } })
        assert.strictEqual(help.exitCode, 0, help.stderr)
        assert.include(help.stdout, "usage: node dist/producer.js")
      }),
    timeout
  )

  it.live(
    "a bad LOG_LEVEL is reported with every other problem, not alone",
    () =>
      Effect.gen(function* () {
        const result = yield* run(producer, {
          env: { ...noBroker, LOG_LEVEL: "verbose", KAFKA_PRODUCER_ACKS: "2" }
        })
        assert.strictEqual(result.exitCode, 2, result.stderr)
        assert.include(result.stderr, 'LOG_LEVEL is "verbose"')
        assert.include(result.stderr, 'KAFKA_PRODUCER_ACKS is "2"')
      }),
    timeout
  )

  it.live(
    "SIGTERM while a program waits for its broker stops it at once, exit 0",
    () =>
      Effect.gen(function* () {
        for (const script of [producer, Program.consumerProgram]) {
          const signalled = yield* Deferred.make<void>()
          const result = yield* run(script, {
            env: noBroker,
            // The second refused attempt: it is waiting for the broker, in the reconnect Schedule.
            onStderr: (soFar, program) => {
              if (soFar.includes("(attempt 2)") && Deferred.doneUnsafe(signalled, Effect.void)) {
                program.child.kill("SIGTERM")
              }
            }
          })
          assert.isTrue(yield* Deferred.isDone(signalled), `${script} waited for the broker`)
          assert.strictEqual(result.exitCode, 0, `${script}: ${result.stderr}`)
          assert.notInclude(result.stderr, "second signal")
        }
      }),
    timeout
  )

  it.live(
    "a program that does not stop within its shutdown bound of the signal is ended then, exit 1, saying so",
    () =>
      Effect.gen(function* () {
        const signalled = yield* Deferred.make<number>()
        const result = yield* run(Path.join(Program.root, "test", "support", "stuckProgram.ts"), {
          env: {},
          onStderr: (soFar, started) => {
            if (soFar.includes("ready") && Deferred.doneUnsafe(signalled, Effect.succeed(performance.now()))) {
              started.child.kill("SIGTERM")
            }
          }
        })
        const took = performance.now() - (yield* Deferred.await(signalled))
        assert.strictEqual(result.exitCode, 1, result.stderr)
        assert.include(result.stderr, "did not stop within 1 s of SIGTERM")
        assert.isBelow(took, 5_000)
      }),
    timeout
  )

  it.live(
    "--help lists every variable with its default, as the README does; a misspelled variable is warned about",
    () =>
      Effect.gen(function* () {
        const help = yield* run(Program.consumerProgram, { args: ["-h"], env: noBroker })
        assert.strictEqual(help.exitCode, 0, help.stderr)
        for (const variable of KafkaConfig.variables) assert.include(help.stdout, `  ${variable} `)
        const readme = Fs.readFileSync(Path.join(Program.root, "README.md"), "utf8")
        for (const [name, fallback] of Help.variables) {
          const row = readme.split("\n").find((line) => line.startsWith("| `") && line.includes(`\`${name}\``))
          assert.include(row?.replaceAll("`", "") ?? "", `| ${fallback} |`, `${name}: the README's default`)
        }
        const signalled = yield* Deferred.make<void>()
        const typo = yield* run(producer, {
          env: { ...noBroker, KAFKA_BROKER: "127.0.0.1:9092" },
          onStderr: (soFar, program) => {
            if (soFar.includes("(attempt 1)") && Deferred.doneUnsafe(signalled, Effect.void))
              program.child.kill("SIGTERM")
          }
        })
        assert.include(typo.stderr, "KAFKA_BROKER is not a variable kafka-effect reads; did you mean KAFKA_BROKERS?")
        // With no broker: one line an attempt naming where it tried, no stack trace.
        assert.include(typo.stderr, "Kafka not reachable at 127.0.0.1:1 (attempt 1)")
        assert.notInclude(typo.stderr, "    at ")
      }),
    timeout
  )

  it.live(
    "the consumer program bounds its heap itself, in the same process, unless the user chose heap flags",
    () =>
      Effect.gen(function* () {
        // The command line of the running process, read once it is retrying its connection.
        const commandLine = (env: Record<string, string>) =>
          Effect.gen(function* () {
            const seen = yield* Deferred.make<{ pid: number | undefined; argv: Array<string> }>()
            yield* run(Program.consumerProgram, {
              env: { ...noBroker, ...env },
              onStderr: (soFar, program) => {
                if (!soFar.includes("(attempt 1)")) return
                const { pid } = program.child
                const argv = Fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0")
                if (Deferred.doneUnsafe(seen, Effect.succeed({ pid, argv }))) program.child.kill("SIGTERM")
              }
            })
            return yield* Deferred.await(seen)
          })
        const bounded = yield* commandLine({})
        for (const flag of heapFlags) assert.include(bounded.argv, flag, bounded.argv.join(" "))
        assert.include(bounded.argv, Program.consumerProgram, "the same program, with its arguments")
        const chosen = yield* commandLine({ NODE_OPTIONS: "--max-old-space-size=300" })
        for (const flag of heapFlags) assert.notInclude(chosen.argv, flag, chosen.argv.join(" "))
        assert.isFalse(userChoseHeap(["--experimental-strip-types"], undefined))
        assert.isTrue(userChoseHeap(["--max-semi-space-size=32"], undefined))
        assert.isTrue(userChoseHeap([], "--enable-source-maps --max-old-space-size=4096"))
        assert.isFalse(userChoseHeap([], "--max-old-space-sizes"))
      }),
    timeout
  )
})
