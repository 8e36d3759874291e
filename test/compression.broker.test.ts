/**
 * Compressed topics written by other clients, and read by them: Kafka's own Java producer and consumer
 * (`Broker.tool`) and kcat (librdkafka), with every codec. The consumer and producer programs run as users run
 * them, as separate processes.
 */
import { execFile } from "node:child_process"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import { inject } from "vitest"
import * as Broker from "../scripts/kafka/broker.ts"
import * as Program from "../scripts/program.ts"
import { awaitCommittedToEnd, consumerProgramEnv, createTopic, uniqueName } from "./support/kafka.ts"

const brokers = inject("kafkaBrokers")
const codecs = ["gzip", "snappy", "lz4", "zstd"] as const

const event = (id: string, source: string, i: number) =>
  JSON.stringify({
    id,
    type: "order.created",
    source,
    timestamp: "2026-12-06T10:00:00.000Z",
    subject: `order-${i % 50}`,
    payload: { n: i, note: "ünïcödé and a longer text so that the batch has something to compress ".repeat(3) }
  })

const events = (source: string, count: number) =>
  Array.from({ length: count }, (_, i) => event(`${source}-${i}`, source, i))

/** kcat (librdkafka) producing `lines` as `key|value` to `topic` with `codec`, one header on each record. */
const kcatProduce = (topic: string, codec: string, lines: ReadonlyArray<string>) =>
  Effect.callback<void, Error>((resume) => {
    const child = execFile(
      "kcat",
      ["-b", brokers, "-P", "-t", topic, "-z", codec, "-K", "|", "-H", "written-by=kcat", "-X", "linger.ms=50"],
      (error, _stdout, stderr) =>
        resume(
          error ? Effect.fail(new Error(`kcat failed (is kcat installed?): ${error.message}\n${stderr}`)) : Effect.void
        )
    )
    child.stdin?.end(`${lines.map((line, i) => `order-${i % 50}|${line}`).join("\n")}\n`)
  })

describe("compressed topics and other clients", () => {
  for (const codec of codecs) {
    it.live(
      `${codec}: 1,000 events from Java's producer and 1,000 from kcat, all handled by the consumer program, lag 0`,
      () =>
        Effect.gen(function* () {
          const topic = uniqueName(`compressed-${codec}`)
          yield* createTopic(brokers, topic, 3)
          yield* Broker.tool(
            "org.apache.kafka.tools.ConsoleProducer",
            [
              "--bootstrap-server",
              brokers,
              "--topic",
              topic,
              "--command-property",
              `compression.type=${codec}`,
              "--command-property",
              "linger.ms=50",
              "--property",
              "parse.key=true",
              "--property",
              "key.separator=|"
            ],
            {
              stdin: `${events("java", 1000)
                .map((line, i) => `order-${i % 50}|${line}`)
                .join("\n")}\n`
            }
          )
          yield* kcatProduce(topic, codec, events("kcat", 1000))
          const groupId = `${topic}-group`
          const consumer = Program.start(Program.consumerProgram, {
            env: consumerProgramEnv(brokers, topic)
          })
          const exitCode = yield* awaitCommittedToEnd(brokers, groupId, topic, "90 seconds").pipe(
            Effect.andThen(Effect.sync(() => consumer.child.kill("SIGTERM"))),
            Effect.andThen(consumer.exited),
            Effect.ensuring(Effect.sync(() => consumer.child.kill("SIGKILL")))
          )
          const { stdout, stderr } = consumer.output()
          assert.strictEqual(exitCode, 0, stderr)
          const summary = JSON.parse(/summary: (.*)/.exec(stdout)?.[1] ?? "{}") as {
            done?: number
            deadLettered?: Record<string, number>
          }
          assert.strictEqual(summary.done, 2000, `every event handled: ${stdout}\n${stderr.slice(-2000)}`)
          assert.deepStrictEqual(summary.deadLettered, {}, "none dead-lettered")
        }),
      150_000
    )
  }

  it.live(
    "our producer with each KAFKA_PRODUCER_COMPRESSION: Java's console consumer reads every record, key and value intact",
    () =>
      Effect.gen(function* () {
        for (const codec of codecs) {
          const topic = uniqueName(`ours-${codec}`)
          yield* createTopic(brokers, topic, 3)
          const lines = events(`ours-${codec}`, 500)
          const run = yield* Program.run(Path.join(Program.root, "src", "producer.ts"), {
            env: { KAFKA_BROKERS: brokers, KAFKA_PRODUCER_TOPIC: topic, KAFKA_PRODUCER_COMPRESSION: codec },
            stdin: `${lines.join("\n")}\n`
          })
          assert.strictEqual(run.exitCode, 0, run.stderr)
          const read = yield* Broker.tool("org.apache.kafka.tools.consumer.ConsoleConsumer", [
            "--bootstrap-server",
            brokers,
            "--topic",
            topic,
            "--from-beginning",
            "--max-messages",
            String(lines.length),
            "--timeout-ms",
            "30000",
            "--formatter-property",
            "print.key=true",
            "--formatter-property",
            "key.separator=|"
          ])
          const got = read
            .split("\n")
            .filter((line) => line.includes("|"))
            .map((line) => {
              const at = line.indexOf("|")
              return { key: line.slice(0, at), value: line.slice(at + 1) }
            })
          assert.sameMembers(
            got.map((record) => record.value),
            lines,
            `${codec}: every value as sent`
          )
          for (const record of got) {
            assert.strictEqual(record.key, JSON.parse(record.value).subject, `${codec}: the key is the subject`)
          }
        }
      }),
    150_000
  )
})
