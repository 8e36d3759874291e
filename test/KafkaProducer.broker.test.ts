import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, Fiber, Layer, Logger, Ref, Schedule } from "effect"
import { inject } from "vitest"
import * as Broker from "../scripts/kafka/broker.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { clientLayer, configFor, createTopic, readTopic, testEngine, uniqueName } from "./support/kafka.ts"
import { kafkajsPartitionFor } from "./support/partitioner.ts"

const brokers = inject("kafkaBrokers")

/** KafkaProducer.layerConfig over KafkaClient.layerConfig, both configured by `env`, against `at`. */
const producerLayer = (at: string, env: Record<string, string> = {}) =>
  KafkaProducer.layerConfig.pipe(Layer.provideMerge(clientLayer(at, env)), Layer.provide(configFor(at, env)))

/** A temporary directory for a broker that must survive its own restart. */
const brokerDir = Effect.acquireRelease(
  Effect.sync(() => Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-restart-"))),
  (dir) => Effect.sync(() => Fs.rmSync(dir, { recursive: true, force: true }))
)

/** 10,000 keyed sends with headers, checked record by record against what the topic holds afterwards. */
const tenThousandSends = Effect.gen(function* () {
  const topic = uniqueName("producer")
  yield* createTopic(brokers, topic, 6)
  const producer = yield* KafkaProducer.KafkaProducer
  const records = Array.from({ length: 10_000 }, (_, i) => ({
    topic,
    key: `key-${i % 1000}`,
    value: JSON.stringify({ index: i }),
    headers: { "x-index": String(i), "x-kind": "test" }
  }))
  // Callers send one record at a time; the service batches them.
  const metadata = yield* Effect.forEach(records, (record) => producer.send(record), { concurrency: 500 })

  const stored = yield* readTopic(brokers, topic)
  assert.strictEqual(stored.length, 10_000, "each record stored once")
  const partitionFor = kafkajsPartitionFor(topic, 6)
  const seen = new Set<number>()
  for (const record of stored) {
    const index = JSON.parse(record.value ?? "null").index as number
    assert.isFalse(seen.has(index), `record ${index} stored twice`)
    seen.add(index)
    assert.strictEqual(record.key, `key-${index % 1000}`)
    assert.deepStrictEqual(record.headers, { "x-index": String(index), "x-kind": "test" })
    assert.strictEqual(record.partition, partitionFor(`key-${index % 1000}`), "kafkajs' partition for the key")
    const acked = metadata[index]
    assert.strictEqual(acked?.partition, record.partition, "send reported the partition it landed on")
    assert.strictEqual(acked?.offset, record.offset, "send reported the offset it landed at")
  }
})

/** Every log line written inside, as text, for the test to wait on. */
const capturedLogs = () => {
  const lines: Array<string> = []
  const logger = Logger.make(({ message }) => {
    lines.push(Array.isArray(message) ? message.join(" ") : String(message))
  })
  return { lines, layer: Logger.layer([logger]) }
}

describe("Producer against a real broker", () => {
  it.live("10,000 sends with keys and headers: each stored once, on kafkajs' partition for its key, intact", () =>
    tenThousandSends.pipe(
      Effect.provide(producerLayer(brokers, { KAFKA_PRODUCER_LINGER_MS: "5", KAFKA_PRODUCER_BATCH_SIZE: "500" }))
    )
  )

  it.live("the same over 3 lanes: the producer's own partition choice is kafkajs', offsets as stored", () =>
    tenThousandSends.pipe(
      Effect.provide(
        KafkaProducer.layer({ lanes: 3, linger: Duration.millis(5), batchSize: 500 }).pipe(
          Layer.provideMerge(clientLayer(brokers))
        )
      )
    )
  )

  it.live(
    "1,000 keys land where Java's producer puts them: the same partition for each key, on 6 partitions",
    () =>
      Effect.gen(function* () {
        const java = uniqueName("keys-java")
        const ours = uniqueName("keys-ours")
        yield* createTopic(brokers, java, 6)
        yield* createTopic(brokers, ours, 6)
        const keys = Array.from({ length: 1_000 }, (_, i) => `customer-${i}-${(i * 7919) % 1000}`)
        yield* Broker.tool(
          "org.apache.kafka.tools.ConsoleProducer",
          [
            "--bootstrap-server",
            brokers,
            "--topic",
            java,
            "--property",
            "parse.key=true",
            "--property",
            "key.separator=|"
          ],
          { stdin: `${keys.map((key) => `${key}|v`).join("\n")}\n` }
        )
        yield* KafkaProducer.sendAll(keys.map((key) => ({ topic: ours, key, value: "v" })))
        const partitionOf = (records: ReadonlyArray<{ readonly key: string | null; readonly partition: number }>) =>
          new Map(records.map((record) => [record.key, record.partition]))
        const javas = partitionOf(yield* readTopic(brokers, java))
        const oursByKey = partitionOf(yield* readTopic(brokers, ours))
        assert.strictEqual(javas.size, 1_000)
        const differ = keys.filter((key) => javas.get(key) !== oursByKey.get(key))
        assert.deepStrictEqual(differ, [], "keys on another partition than Java's")
        assert.strictEqual(new Set(javas.values()).size, 6, "the keys spread over every partition")
      }).pipe(Effect.provide(producerLayer(brokers, { KAFKA_PRODUCER_LINGER_MS: "0" }))),
    60_000
  )

  it.live("a send to a topic that does not exist fails with UnknownTopic, not a retry storm", () =>
    Effect.gen(function* () {
      const topic = uniqueName("missing")
      const error = yield* Effect.flip(KafkaProducer.send({ topic, value: "x" }))
      assert.strictEqual(error._tag, "KafkaError")
      if (error._tag === "KafkaError") {
        assert.isFalse(error.retriable)
        assert.include(error.message, topic)
      }
    }).pipe(Effect.provide(producerLayer(brokers, { KAFKA_PRODUCER_LINGER_MS: "0" })))
  )

  it.live("a record for a partition that does not exist fails alone; its batch-mates are stored once", () =>
    Effect.gen(function* () {
      const topic = uniqueName("partitions")
      yield* createTopic(brokers, topic, 2)
      const producer = yield* KafkaProducer.KafkaProducer
      // One linger: the three records leave in one request, unless the bad one is refused before it is queued.
      const [first, error, second] = yield* Effect.all(
        [
          producer.send({ topic, partition: 0, value: "to 0" }),
          Effect.flip(producer.send({ topic, partition: 5, value: "to 5" })),
          producer.send({ topic, partition: 1, value: "to 1" })
        ],
        { concurrency: "unbounded" }
      )
      assert.deepStrictEqual([first.partition, second.partition], [0, 1])
      assert.strictEqual(error._tag, "KafkaError")
      if (error._tag === "KafkaError") {
        assert.isFalse(error.retriable)
        assert.include(error.message, `partition 5 of ${topic} does not exist (it has 2)`)
      }
      const stored = yield* readTopic(brokers, topic)
      assert.deepStrictEqual(stored.map((record) => record.value).sort(), ["to 0", "to 1"], "each stored once")
    }).pipe(Effect.provide(producerLayer(brokers, { KAFKA_PRODUCER_LINGER_MS: "200" })))
  )

  it.live("started before its broker, the producer waits for it, connects and delivers", () =>
    Effect.gen(function* () {
      const dir = yield* brokerDir
      // A port nobody listens on yet: the broker comes up there 3 s after the producer starts.
      const port = yield* Effect.promise(() => import("node:net")).pipe(
        Effect.flatMap((Net) =>
          Effect.callback<number>((resume) => {
            const server = Net.createServer().listen(0, "127.0.0.1", () => {
              const address = server.address()
              server.close(() => resume(Effect.succeed(typeof address === "object" && address ? address.port : 0)))
            })
          })
        )
      )
      const at = `127.0.0.1:${port}`
      const topic = uniqueName("late-broker")
      const topicReady = yield* Deferred.make<void>()
      const producing = yield* Effect.forkChild(
        Effect.gen(function* () {
          const producer = yield* KafkaProducer.KafkaProducer
          yield* Deferred.await(topicReady)
          return yield* producer.send({ topic, key: "k", value: "delivered" })
        }).pipe(
          Effect.provide(
            producerLayer(at, { KAFKA_RECONNECT_BACKOFF_MS: "100", KAFKA_RECONNECT_BACKOFF_MAX_MS: "500" })
          ),
          Effect.scoped
        )
      )
      // The scenario itself: the broker is down for 3 s.
      yield* Effect.sleep("3 seconds")
      assert.isUndefined(producing.pollUnsafe(), "the producer is still waiting, not exited")
      const broker = yield* Effect.acquireRelease(Broker.start({ port, dir }), Broker.stop)
      yield* createTopic(broker.brokers, topic, 1)
      yield* Deferred.succeed(topicReady, undefined)
      const metadata = yield* Fiber.join(producing)
      assert.strictEqual(metadata.offset, 0n)
      const stored = yield* readTopic(broker.brokers, topic)
      assert.deepStrictEqual(
        stored.map((r) => r.value),
        ["delivered"]
      )
    }).pipe(Effect.scoped)
  )

  it.live("with its broker gone for good, a send fails with a typed error after its retries and the scope closes", () =>
    Effect.gen(function* () {
      const dir = yield* brokerDir
      const broker = yield* Broker.start({ dir })
      const topic = uniqueName("gone")
      yield* createTopic(broker.brokers, topic, 1)
      const outcome = yield* Effect.gen(function* () {
        const producer = yield* KafkaProducer.KafkaProducer
        yield* producer.send({ topic, key: "k", value: "before" })
        process.kill(broker.pid, "SIGKILL")
        // The first failure replaces the idempotent kafkajs producer; each retry then tries to connect the new one
        // once. (Reconnecting until the broker came back held the send, its callers and the shutdown for ever.)
        return yield* producer.send({ topic, key: "k", value: "after" }).pipe(Effect.flip)
      }).pipe(
        Effect.provide(
          producerLayer(broker.brokers, {
            KAFKA_PRODUCER_RETRIES: "3",
            KAFKA_RECONNECT_BACKOFF_MS: "100",
            KAFKA_RECONNECT_BACKOFF_MAX_MS: "300"
          })
        ),
        Effect.scoped,
        Effect.timeoutOption("60 seconds")
      )
      assert.isTrue(outcome._tag === "Some", "the send failed and the scope closed within 60 s")
      if (outcome._tag === "Some") {
        const error = outcome.value
        assert.strictEqual(error._tag, "KafkaError")
        if (error._tag === "KafkaError") assert.strictEqual(error.reason._tag, "ConnectionFailed", error.message)
      }
    }).pipe(Effect.scoped)
  )

  it.live(
    "a broker frozen past the request timeout: every record acked at its stored offset; kafkajs' resend of the same batch is dropped by the broker as a copy",
    () =>
      Effect.gen(function* () {
        const dir = yield* brokerDir
        const broker = yield* Effect.acquireRelease(Broker.start({ dir }), (broker) =>
          Effect.sync(() => Broker.isAlive(broker.pid) && process.kill(broker.pid, "SIGCONT")).pipe(
            Effect.andThen(Broker.stop(broker))
          )
        )
        const topic = uniqueName("frozen")
        yield* createTopic(broker.brokers, topic, 3)
        const logs = capturedLogs()
        const total = 300
        const exits = yield* Effect.gen(function* () {
          const producer = yield* KafkaProducer.KafkaProducer
          yield* producer.send({ topic, key: "warm-up", value: "-1" })
          // Frozen, the broker's socket still takes the request; it is written once the broker runs again, long
          // after the client gave up on its answer. The client's retries of it wait in the same socket.
          process.kill(broker.pid, "SIGSTOP")
          const sending = yield* Effect.forkChild(
            Effect.forEach(
              Array.from({ length: total }, (_, i) => i),
              (i) => producer.send({ topic, key: `key-${i % 30}`, value: String(i) }).pipe(Effect.exit),
              { concurrency: total }
            )
          )
          // Thawed once the Producer itself has seen a request time out and is about to send the batch again.
          yield* Effect.sync(() => logs.lines.some((line) => line.includes("produce failed, will retry"))).pipe(
            Effect.repeat({ schedule: Schedule.spaced("50 millis"), until: (seen) => seen }),
            Effect.timeoutOrElse({
              duration: "60 seconds",
              orElse: () => Effect.die(new Error(`no produce retry within 60 s: ${logs.lines.join(" | ")}`))
            })
          )
          process.kill(broker.pid, "SIGCONT")
          return yield* Fiber.join(sending)
        }).pipe(
          Effect.provide(
            producerLayer(broker.brokers, {
              KAFKA_REQUEST_TIMEOUT_MS: "1000",
              KAFKA_PRODUCER_RETRIES: "20",
              KAFKA_PRODUCER_LINGER_MS: "20",
              KAFKA_PRODUCER_BATCH_SIZE: "1000",
              KAFKA_RECONNECT_BACKOFF_MAX_MS: "500"
            })
          ),
          Effect.provide(logs.layer),
          Effect.scoped
        )
        const stored = (yield* readTopic(broker.brokers, topic)).filter((record) => record.value !== "-1")
        const storedAt = new Map(stored.map((r) => [`${r.partition}/${r.offset}`, r.value]))
        const copies = new Map<string, number>()
        for (const record of stored) copies.set(record.value ?? "", (copies.get(record.value ?? "") ?? 0) + 1)
        exits.forEach((exit, i) => {
          assert.isTrue(Exit.isSuccess(exit), `record ${i} acked: ${String(exit)}`)
          if (Exit.isSuccess(exit)) {
            const { partition, offset } = exit.value
            assert.strictEqual(storedAt.get(`${partition}/${offset}`), String(i), `record ${i} at its acked offset`)
          }
        })
        const twice = stored.length - copies.size
        console.log(`broker frozen past the request timeout: ${total} acked, ${twice} stored twice`)
        assert.strictEqual(copies.size, total, "every record stored")
        // kafkajs sends the same batch again on the same producer id and sequence numbers; @platformatic/kafka takes
        // a fresh producer id after a failed send, so its copy is stored again (at-least-once).
        if (testEngine.KAFKA_CLIENT !== "platformatic") {
          assert.strictEqual(twice, 0, "stored once: the broker dropped the resent batch as a copy")
        }
      }).pipe(Effect.scoped),
    120_000
  )

  it.live(
    "a broker killed mid-stream and restarted: every send is acked and stored, or failed with a typed error",
    () =>
      Effect.gen(function* () {
        const dir = yield* brokerDir
        const first = yield* Broker.start({ dir })
        const topic = uniqueName("killed")
        yield* createTopic(first.brokers, topic, 3)
        const acked = yield* Ref.make(0)
        const total = 3_000
        const sending = yield* Effect.forkChild(
          Effect.forEach(
            Array.from({ length: total }, (_, i) => i),
            (i) =>
              KafkaProducer.send({ topic, key: `key-${i % 50}`, value: String(i) }).pipe(
                Effect.tap(() => Ref.update(acked, (n) => n + 1)),
                Effect.exit
              ),
            { concurrency: 20 }
          ).pipe(
            Effect.provide(
              producerLayer(first.brokers, {
                KAFKA_PRODUCER_RETRIES: "30",
                KAFKA_PRODUCER_LINGER_MS: "2",
                KAFKA_PRODUCER_BATCH_SIZE: "50",
                KAFKA_RECONNECT_BACKOFF_MAX_MS: "500"
              })
            ),
            Effect.scoped
          )
        )
        // Kill it once a third of the records are acked.
        yield* Ref.get(acked).pipe(
          Effect.repeat({ until: (n) => n >= total / 3, schedule: Schedule.spaced("10 millis") })
        )
        process.kill(first.pid, "SIGKILL")
        const second = yield* Effect.acquireRelease(Broker.start({ dir, port: first.port }), Broker.stop)

        const exits = yield* Fiber.join(sending)
        const stored = yield* readTopic(second.brokers, topic)
        const storedAt = new Map(stored.map((r) => [`${r.partition}/${r.offset}`, r.value]))
        const storedValues = new Set(stored.map((r) => r.value))
        let ok = 0
        const lost: Array<number> = []
        const misplaced: Array<string> = []
        exits.forEach((exit, i) => {
          if (Exit.isSuccess(exit)) {
            ok++
            const { partition, offset } = exit.value
            if (!storedValues.has(String(i))) lost.push(i)
            else if (storedAt.get(`${partition}/${offset}`) !== String(i)) {
              misplaced.push(`${i}@${partition}/${offset} holds ${storedAt.get(`${partition}/${offset}`)}`)
            }
          } else {
            const error = Exit.findErrorOption(exit)
            assert.isTrue(error._tag === "Some", `record ${i} failed with a typed error, not a defect`)
            if (error._tag === "Some") assert.oneOf(error.value._tag, ["KafkaError", "ProducerClosed"])
          }
        })
        // An acked record must be in the topic, at the offset its ack gave. (The loss this guards against: after a
        // failed send kafkajs reused sequence numbers the broker had already stored, so the broker took a later,
        // different batch for a duplicate and acked it with the stored batch's offsets.)
        // At-least-once: a send retried after the kill may have been stored twice. Counted and reported, not failed.
        const duplicated = stored.length - storedValues.size
        console.log(`broker killed mid-stream: ${ok} of ${total} acked, 0 lost allowed, ${duplicated} stored twice`)
        assert.deepStrictEqual(lost, [], "every acked record is in the topic")
        assert.deepStrictEqual(misplaced, [], "every acked record is at the offset its ack gave")
        assert.strictEqual(exits.length, total, "every send completed")
        assert.isAtLeast(ok, total / 3, "the records acked before the kill are among the acked")
      }).pipe(Effect.scoped),
    180_000
  )
})
