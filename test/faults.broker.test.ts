/**
 * Faults that a shared broker cannot have: a broker frozen with SIGSTOP (it neither refuses nor answers, so every
 * wait has to end by a timeout of ours), and a corrupt log segment written while it is stopped. The file has a
 * broker of its own, on a directory of its own so that it can be restarted on its data; freezing or corrupting the
 * shared one would fail every other test file.
 */
import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Broker from "../scripts/kafka/broker.ts"
import * as Program from "../scripts/program.ts"
import { eventually, freePort, get } from "./support/http.ts"
import {
  awaitCommittedToEnd,
  committedOffsets,
  consumerProgramEnv,
  createTopic,
  readTopic,
  uniqueName
} from "./support/kafka.ts"

const dir = Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-faults-"))
let broker: Broker.Broker
beforeAll(async () => {
  broker = await Effect.runPromise(Broker.start({ dir }))
})
afterAll(async () => {
  await Effect.runPromise(Broker.stop(broker))
  Fs.rmSync(dir, { recursive: true, force: true })
})

/** Stops the broker, runs `change` on its stopped data, and starts it again on the same port and data. */
const restartWith = (change: () => void) =>
  Effect.gen(function* () {
    yield* Broker.stop(broker)
    change()
    broker = yield* Broker.start({ dir, port: broker.port })
  })

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

describe("faults of a broker of its own", () => {
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
          env: consumerProgramEnv(broker.brokers, topic, {
            KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS: "3000",
            LOG_LEVEL: "debug"
          }),
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

  it.live(
    "a frozen broker turns the consumer program's /readyz 503 within the session timeout + a heartbeat, saying why; thawed, 200 again and every record handled",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("frozen-ready")
        const groupId = `${topic}-group`
        const produced = yield* Program.run(Path.join(Program.root, "src", "producer.ts"), {
          args: ["--create-topic", "--count", "2000", "--rate", "0"],
          env: { KAFKA_BROKERS: broker.brokers, KAFKA_PRODUCER_TOPIC: topic }
        })
        assert.strictEqual(produced.exitCode, 0, produced.stderr)
        const port = yield* freePort
        const consumer = Program.start(Program.consumerProgram, {
          args: ["--work-ms", "20"],
          env: consumerProgramEnv(broker.brokers, topic, {
            KAFKA_CONSUMER_SESSION_TIMEOUT_MS: "10000",
            KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS: "1000",
            METRICS_PORT: String(port)
          })
        })
        yield* Effect.gen(function* () {
          const readyz = get(`http://127.0.0.1:${port}/readyz`)
          yield* eventually(readyz, (r) => r.status === 200, "ready before the freeze")
          process.kill(broker.pid, "SIGSTOP")
          const frozenAt = performance.now()
          const down = yield* eventually(readyz, (r) => r.status === 503, "not ready while frozen", "40 seconds").pipe(
            Effect.ensuring(Effect.sync(() => process.kill(broker.pid, "SIGCONT")))
          )
          const took = performance.now() - frozenAt
          assert.isBelow(took, 10_000 + 1_000 + 3_000, `503 after ${Math.round(took)} ms`)
          const reasons = JSON.parse(down.body).reasons as Record<string, string>
          assert.match(reasons[`consumer ${groupId}`] ?? JSON.stringify(reasons), /no answer from the brokers/)
          yield* eventually(readyz, (r) => r.status === 200, "ready again after the thaw", "60 seconds")
          yield* awaitCommittedToEnd(broker.brokers, groupId, topic, "90 seconds")
          consumer.child.kill("SIGTERM")
          yield* consumer.exited
        }).pipe(Effect.ensuring(Effect.sync(() => consumer.child.kill("SIGKILL"))))
        const summary = JSON.parse(/summary: (.*)/.exec(consumer.output().stdout)?.[1] ?? "{}") as { done?: number }
        assert.isAtLeast(summary.done ?? 0, 2000, "every record handled (at least once)")
      }),
    180_000
  )

  it.live(
    "a corrupt compressed batch stops the consumer program with exit 1, naming the partition, its offsets and the way past it; no restart loop",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("corrupt")
        yield* createTopic(broker.brokers, topic, 1)
        const lines = Array.from({ length: 200 }, (_, i) =>
          JSON.stringify({
            id: `c${i}`,
            type: "order.created",
            source: "test",
            timestamp: "2026-12-06T10:00:00.000Z",
            payload: { text: "some text to compress ".repeat(4) }
          })
        )
        const produced = yield* Program.run(Path.join(Program.root, "src", "producer.ts"), {
          env: { KAFKA_BROKERS: broker.brokers, KAFKA_PRODUCER_TOPIC: topic, KAFKA_PRODUCER_COMPRESSION: "snappy" },
          stdin: `${lines.join("\n")}\n`
        })
        assert.strictEqual(produced.exitCode, 0, produced.stderr)
        // Overwrite the first batch's compressed records (its 61-byte header is left alone, and so is every byte past
        // it: how the program's sends fell into batches depends on timing, and a broken header of the next batch
        // would stop the broker itself): the broker, restarted after a clean stop, serves the segment as it is.
        yield* restartWith(() => {
          const segment = Path.join(dir, "data", `${topic}-0`, "00000000000000000000.log")
          const bytes = Fs.readFileSync(segment)
          // A batch: base offset (8 bytes), then its length from there on (4), then the rest of the header.
          const firstBatchEnd = 12 + bytes.readInt32BE(8)
          assert.isAtMost(firstBatchEnd, bytes.length)
          assert.isAbove(firstBatchEnd - 4 - 70, 32, "the first batch has compressed records to overwrite")
          bytes.fill(0xa5, 70, firstBatchEnd - 4)
          Fs.writeFileSync(segment, bytes)
        })
        const started = performance.now()
        const run = yield* Program.run(Program.consumerProgram, {
          env: consumerProgramEnv(broker.brokers, topic),
          timeout: 90_000
        })
        assert.strictEqual(run.exitCode, 1, run.stderr.slice(-3000))
        assert.isBelow(performance.now() - started, 60_000, "it stops, rather than restart for ever")
        assert.match(
          run.stderr,
          new RegExp(
            `consume on ${topic}\\[0\\] failed \\(CorruptBatch\\): a snappy record batch of ${topic}\\[0\\] at offsets 0–\\d+ could not be decompressed`
          )
        )
        assert.include(run.stderr, "--reset-offsets --to-offset")
        assert.notInclude(run.stderr, "restarting")
      }),
    180_000
  )

  it.live(
    "start, work, a broker restart, a rebalance and a stop at the default log level: no ERROR line but the dead letter's",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("quiet")
        const groupId = `${topic}-group`
        yield* createTopic(broker.brokers, topic, 3)
        const env = consumerProgramEnv(broker.brokers, topic)
        const produce = Program.run(Path.join(Program.root, "src", "producer.ts"), {
          args: ["--count", "500", "--rate", "0"],
          env: { KAFKA_BROKERS: broker.brokers, KAFKA_PRODUCER_TOPIC: topic, LOG_FORMAT: "json" }
        })
        const outputs: Array<string> = []
        const a = Program.start(Program.consumerProgram, { env })
        let b: Program.Program | undefined
        yield* Effect.gen(function* () {
          outputs.push((yield* produce).stderr)
          // One record no event decoder accepts: its dead letter is the one ERROR line expected.
          yield* Broker.tool(
            "org.apache.kafka.tools.ConsoleProducer",
            ["--bootstrap-server", broker.brokers, "--topic", topic],
            {
              stdin: "{not json\n"
            }
          )
          yield* awaitCommittedToEnd(broker.brokers, groupId, topic, "90 seconds")
          yield* restartWith(() => {})
          outputs.push((yield* produce).stderr)
          b = Program.start(Program.consumerProgram, { env })
          yield* eventually(
            Effect.sync(() => b?.output().stderr ?? ""),
            (out) => out.includes(`"consuming ${topic} as `),
            "the second member",
            // Its start-up, then a join that waits for the first member to rejoin (within the session timeout,
            // 30 s): on a machine whose cores are both busy, more than a minute.
            "180 seconds"
          )
          outputs.push((yield* produce).stderr)
          yield* awaitCommittedToEnd(broker.brokers, groupId, topic, "90 seconds")
          for (const program of [a, b]) {
            program.child.kill("SIGTERM")
            assert.strictEqual(yield* program.exited, 0, program.output().stderr.slice(-2000))
            outputs.push(program.output().stderr)
          }
        }).pipe(
          Effect.ensuring(
            Effect.sync(() => {
              a.child.kill("SIGKILL")
              b?.child.kill("SIGKILL")
            })
          )
        )
        const errors = outputs
          .flatMap((output) => output.split("\n"))
          .filter((line) => line.includes('"level":"ERROR"'))
          .map((line) => String((JSON.parse(line) as { message: unknown }).message))
        assert.strictEqual(errors.length, 1, errors.join("\n"))
        assert.match(errors[0] ?? "", /^dead-lettered: InvalidJson: /)
      }),
    240_000
  )
})
