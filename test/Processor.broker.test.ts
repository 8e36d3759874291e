/**
 * The Processor against a real broker: poison records, and a consumer killed while records wait in a retry topic.
 * The consumer program runs as its own OS process, from src/ with type stripping.
 */
import { assert, describe, it } from "@effect/vitest"
import { Duration, Effect, Fiber, Layer, Metric } from "effect"
import { inject } from "vitest"
import * as Program from "../scripts/program.ts"
import * as Event from "../src/Event.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import * as Metrics from "../src/Metrics.ts"
import * as Processor from "../src/Processor.ts"
import * as RetryPolicy from "../src/RetryPolicy.ts"
import { clientLayer, createTopic, eventually, readTopic, uniqueName } from "./support/kafka.ts"

const brokers = inject("kafkaBrokers")

const event = (id: string, extra: Record<string, unknown> = {}) =>
  JSON.stringify({
    id,
    type: "order.created",
    source: "test",
    timestamp: "2026-11-28T10:00:00.000Z",
    subject: "s",
    payload: {},
    ...extra
  })

/**
 * How many records `topic` holds; -1 while the broker cannot say yet (a topic the program created a moment ago may
 * not have its leader yet: "This server is not the leader for that topic-partition", retriable).
 */
const endOffsets = (topic: string) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const offsets = yield* client.admin.fetchTopicOffsets(topic)
    return offsets.reduce((sum, p) => sum + Number(p.high), 0)
  }).pipe(
    Effect.catchIf(
      (error) => error.retriable,
      () => Effect.succeed(-1)
    )
  )

describe("Processor on a real broker", () => {
  it.live(
    "poison records land in the DLQ with their reason while the records around them are processed in order",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("poison")
        yield* createTopic(brokers, topic, 3)
        const processed: Array<string> = []
        const options: Processor.ProcessorOptions = {
          consumer: {
            groupId: uniqueName("poison-group"),
            workers: 4,
            maxInFlight: 100,
            fromBeginning: true,
            commitInterval: Duration.millis(200),
            shutdownTimeout: Duration.seconds(5)
          },
          retryTopicPrefix: `${topic}-retry`,
          retryMax: 2,
          dlqTopic: `${topic}-dlq`,
          createTopics: true
        }
        const layer = Processor.layer(options).pipe(
          Layer.provideMerge(KafkaProducer.layer({ linger: Duration.zero })),
          Layer.provideMerge(clientLayer(brokers))
        )
        yield* Effect.gen(function* () {
          const processor = yield* Processor.Processor
          const fiber = yield* Effect.forkChild(
            processor.run([
              Processor.handler({
                topic,
                value: Event.Event,
                handle: ({ value }) => Effect.sync(() => processed.push(value.id))
              })
            ])
          )
          // One key: one partition, one worker; the poison must not hold up the records after it.
          const poison: ReadonlyArray<string | Uint8Array | null> = [
            event("good-1"),
            '{"id": "broken", ',
            event("good-2"),
            event("bad-time", { timestamp: "yesterday" }),
            event("good-3"),
            new Uint8Array([0xff, 0xfe, 0x41]),
            event("good-4"),
            null,
            event("good-5"),
            // Large, and not an event: kept whole in the DLQ.
            JSON.stringify({ blob: "x".repeat(900_000) }),
            event("good-6"),
            // Just under the broker's message.max.bytes: with the history headers it no longer fits, so its
            // dead letter goes without the value.
            JSON.stringify({ blob: "y".repeat(1_048_400 - 11) }),
            event("good-7")
          ]
          const producer = yield* KafkaProducer.KafkaProducer
          for (const value of poison) yield* producer.send({ topic, key: "k", value })

          yield* eventually(
            Effect.map(processor.stats, (stats) => stats.done === 7 && Object.values(stats.deadLettered).length > 0),
            "the good records"
          )
          yield* eventually(
            Effect.map(endOffsets(options.dlqTopic), (n) => n === 6),
            "six dead letters"
          )
          // The near-limit dead letter was stored, without its value: not a failed send.
          const count = (metric: typeof Metrics.recordsProduceFailed) =>
            Effect.map(Metric.value(Metric.withAttributes(metric, { topic: options.dlqTopic })), (state) => state.count)
          assert.strictEqual(yield* count(Metrics.deadLetterValuesDropped), 1)
          assert.strictEqual(yield* count(Metrics.recordsProduceFailed), 0)
          yield* Fiber.interrupt(fiber)
        }).pipe(Effect.provide(layer))

        assert.deepStrictEqual(processed, ["good-1", "good-2", "good-3", "good-4", "good-5", "good-6", "good-7"])
        const dlq = yield* readTopic(brokers, options.dlqTopic)
        assert.deepStrictEqual(
          dlq.map((record) => record.headers[RetryPolicy.headers.errorTag]),
          ["InvalidJson", "SchemaViolation", "InvalidUtf8", "NullValue", "SchemaViolation", "SchemaViolation"]
        )
        assert.match(dlq[1]?.headers[RetryPolicy.headers.errorMessage] ?? "", /timestamp/)
        assert.strictEqual(dlq[0]?.value, '{"id": "broken", ')
        assert.strictEqual(dlq[3]?.value, null)
        assert.strictEqual(dlq[4]?.value?.length, 900_000 + 11, "the 900 kB record is kept whole")
        assert.strictEqual(dlq[5]?.value, null, "the near-limit record's value is dropped")
        assert.match(dlq[5]?.headers[RetryPolicy.headers.valueDropped] ?? "", /^1048400 bytes: too large/)
        for (const record of dlq) {
          assert.strictEqual(record.key, "k")
          assert.strictEqual(record.headers[RetryPolicy.headers.originalTopic], topic)
          assert.strictEqual(record.headers[RetryPolicy.headers.attempt], "1")
        }
        assert.lengthOf(yield* readTopic(brokers, `${topic}-retry-1`), 0, "fatal failures skip the retry topics")
      }),
    120_000
  )

  it.live(
    "a consumer killed while records wait in a retry topic loses nothing once it is started again",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("waiting")
        yield* createTopic(brokers, topic, 3)
        const env = {
          KAFKA_BROKERS: brokers,
          KAFKA_CONSUMER_TOPIC: topic,
          KAFKA_CONSUMER_GROUP_ID: uniqueName("waiting-group"),
          KAFKA_RETRY_TOPIC_PREFIX: `${topic}-retry`,
          KAFKA_DLQ_TOPIC: `${topic}-dlq`,
          KAFKA_CONSUMER_RETRY_MAX: "2",
          KAFKA_RETRY_DELAYS_MS: "3000",
          KAFKA_CREATE_TOPICS: "true",
          KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
          // A killed member is noticed after its session timeout: keep it short.
          KAFKA_CONSUMER_SESSION_TIMEOUT_MS: "6000",
          KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS: "1000",
          LOG_LEVEL: "debug",
          LOG_FORMAT: "json"
        }
        const processed = new Set<string>()
        // Every event fails on the main topic and waits 3 s in the retry topic.
        const first = startConsumer(env, processed, ["--transient-failures", "1"])
        const ids = Array.from({ length: 40 }, (_, i) => `e-${i}`)
        yield* Effect.gen(function* () {
          yield* eventually(first.ready, "the first consumer")
          const producer = yield* KafkaProducer.KafkaProducer
          yield* producer.sendAll(ids.map((id) => ({ topic, key: id, value: event(id, { subject: id }) })))
          yield* eventually(
            Effect.map(endOffsets(`${topic}-retry-1`), (n) => n === ids.length),
            "every record in the retry topic"
          )
          first.child.kill("SIGKILL")
          // Each record is due 3 s after it reached the retry topic: on a busy machine the first ones may be due
          // (and handled) before the last one is there. What matters is that some were still waiting.
          assert.isBelow(processed.size, ids.length, "records were still waiting in the retry topic when it died")
          const second = startConsumer(env, processed, ["--transient-failures", "1"])
          yield* eventually(
            Effect.sync(() => processed.size === ids.length),
            "every record processed after the restart",
            "90 seconds"
          )
          second.child.kill("SIGTERM")
          const exit = yield* second.exited
          assert.strictEqual(exit, 0, second.stderr())
        }).pipe(
          Effect.provide(KafkaProducer.layer({ topic }).pipe(Layer.provideMerge(clientLayer(brokers)))),
          Effect.ensuring(Effect.sync(() => first.child.kill("SIGKILL")))
        )
        assert.sameMembers([...processed], ids)
        assert.lengthOf(yield* readTopic(brokers, `${topic}-dlq`), 0)
      }),
    150_000
  )
})

/** The consumer program as a process; the ids it processed (from its debug logs) go into `processed`. */
const startConsumer = (env: Record<string, string>, processed: Set<string>, args: ReadonlyArray<string>) => {
  let started = false
  let pending = ""
  const program = Program.start(Program.consumerProgram, {
    args,
    env,
    onStderr: (chunk) => {
      pending += chunk
      const lines = pending.split("\n")
      pending = lines.pop() ?? ""
      for (const line of lines) {
        if (!line.startsWith("{")) continue
        const log = JSON.parse(line) as { message: unknown; annotations?: Record<string, unknown> }
        const message = String(log.message)
        if (message.startsWith("processing ")) started = true
        if (message.startsWith("processed ") && typeof log.annotations?.id === "string")
          processed.add(log.annotations.id)
      }
    }
  })
  return { ...program, ready: Effect.sync(() => started), stderr: () => program.output().stderr }
}
