/**
 * A signal ends either program within its documented bound while its broker is frozen (SIGSTOP): the hung broker
 * is the case where nothing answers and every wait has to end by a timeout of ours. The file has a broker of its
 * own, since freezing the shared one would stall every other test file.
 */
import * as Path from "node:path"
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Effect, Exit, Scope } from "effect"
import * as Broker from "../scripts/kafka/broker.ts"
import * as Program from "../scripts/program.ts"
import { committedOffsets, createTopic, readTopic, uniqueName } from "./support/kafka.ts"

const scope = Effect.runSync(Scope.make())
let broker: Broker.Broker
beforeAll(async () => {
  broker = await Effect.runPromise(Broker.acquire().pipe(Scope.provide(scope)))
})
afterAll(() => Effect.runPromise(Scope.close(scope, Exit.void)))

const count = (text: string, needle: string) => text.split(needle).length - 1

/**
 * Runs a program; after its `flowing`-th line containing `marker` on stderr the broker is frozen, and at the next
 * one the program gets SIGTERM (by then it has work waiting on the frozen broker). Returns the run and how long it
 * took to exit after the signal. The broker is thawed whatever happens.
 */
const freezeThenSignal = (
  script: string,
  options: { args: ReadonlyArray<string>; env: Record<string, string>; marker: string; flowing: number }
) =>
  Effect.gen(function* () {
    let frozenAt = 0
    let signalledAt = 0
    const run = yield* Program.run(script, {
      args: options.args,
      env: { KAFKA_BROKERS: broker.brokers, LOG_FORMAT: "json", ...options.env },
      onStderr: (soFar, started) => {
        const seen = count(soFar, options.marker)
        if (frozenAt === 0 && seen >= options.flowing) {
          frozenAt = seen
          process.kill(broker.pid, "SIGSTOP")
        } else if (frozenAt > 0 && seen > frozenAt && signalledAt === 0) {
          signalledAt = performance.now()
          started.child.kill("SIGTERM")
        }
      },
      timeout: 90_000
    }).pipe(Effect.ensuring(Effect.sync(() => process.kill(broker.pid, "SIGCONT"))))
    assert.isAbove(signalledAt, 0, `never signalled:\n${run.stderr}`)
    return { run, took: performance.now() - signalledAt }
  })

describe("a signal while the broker is frozen", () => {
  it.live(
    "the producer program exits 1 within the flush timeout + 5 s, and counts the unacked sends as failed",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("frozen-producer")
        yield* createTopic(broker.brokers, topic, 3)
        const { run, took } = yield* freezeThenSignal(Path.join(Program.root, "src", "producer.ts"), {
          args: ["--count", "0", "--rate", "200"],
          env: { KAFKA_PRODUCER_TOPIC: topic, KAFKA_PRODUCER_FLUSH_TIMEOUT_MS: "3000" },
          // Events flow at the first progress line; at the next one, a tick's sends wait on the frozen broker.
          marker: "progress: sent",
          flowing: 1
        })
        assert.isBelow(took, 8_000, `exited ${Math.round(took)} ms after SIGTERM`)
        assert.strictEqual(run.exitCode, 1, run.stderr)
        const [, sent, failed] = (/summary: sent (\d+), invalid 0, failed (\d+)/.exec(run.stdout) ?? []).map(Number)
        assert.isAbove(failed ?? 0, 0, `the sends waiting on the frozen broker are counted as failed: ${run.stdout}`)
        const stored = (yield* readTopic(broker.brokers, topic)).length
        assert.isAtLeast(stored, sent ?? Number.NaN, "every acked send is stored")
        assert.isAtMost(stored, (sent ?? 0) + (failed ?? 0), "nothing stored beyond what was sent or in flight")
      }),
    120_000
  )

  it.live(
    "the consumer program exits 0 within the shutdown timeout + 15 s, with its summary, and nothing is committed past what it finished",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("frozen-consumer")
        const produced = yield* Program.run(Path.join(Program.root, "src", "producer.ts"), {
          args: ["--create-topic", "--count", "3000", "--rate", "0"],
          env: { KAFKA_BROKERS: broker.brokers, KAFKA_PRODUCER_TOPIC: topic }
        })
        assert.strictEqual(produced.exitCode, 0, produced.stderr)
        const { run, took } = yield* freezeThenSignal(Path.join(Program.root, "src", "consumer.ts"), {
          // 20 ms a record on 5 workers: 3,000 records take about 12 s, so work is in flight when the broker freezes.
          args: ["--work-ms", "20"],
          env: {
            KAFKA_CONSUMER_TOPIC: topic,
            KAFKA_CONSUMER_GROUP_ID: `${topic}-group`,
            KAFKA_RETRY_TOPIC_PREFIX: `${topic}-retry`,
            KAFKA_DLQ_TOPIC: `${topic}-dlq`,
            KAFKA_CREATE_TOPICS: "true",
            KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS: "3000",
            KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
            LOG_LEVEL: "debug"
          },
          // Records are being processed (debug lines per record): freeze; at the next one, signal.
          marker: '"processed ',
          flowing: 50
        })
        assert.isBelow(took, 18_000, `exited ${Math.round(took)} ms after SIGTERM`)
        assert.strictEqual(run.exitCode, 0, run.stderr)
        const done = Number(/summary: \{"done":(\d+)/.exec(run.stdout)?.[1] ?? Number.NaN)
        assert.isAbove(done, 0, run.stdout)
        assert.isBelow(done, 3_000, "stopped part way")
        // Every record here succeeds at once, on the main topic: what is committed there is at most what was done.
        const committed = [...(yield* committedOffsets(broker.brokers, `${topic}-group`, topic)).values()]
        const total = committed.reduce((sum, offset) => sum + (offset > 0n ? offset : 0n), 0n)
        assert.isAtMost(Number(total), done, `committed ${total}, done ${done}`)
      }),
    120_000
  )
})
