/**
 * The smoke round trip through a real broker with plain kafkajs: create a topic, produce keyed records with
 * headers, consume them in a group with manual commits, read the committed offsets back with admin.
 *
 * Every kafkajs call is wrapped so that a failure names the broker and the step, and the whole trip is bounded
 * in time: a dead broker makes it fail with a message, never hang.
 */
import { randomBytes } from "node:crypto"
import { Data, Deferred, Duration, Effect, type Scope } from "effect"
import { type Admin, type Consumer, Kafka, type KafkaConfig, logLevel, type Producer } from "kafkajs"

export class SmokeError extends Data.TaggedError("SmokeError")<{
  readonly brokers: string
  readonly step: string
  readonly reason: string
}> {
  override get message() {
    return `Kafka at ${this.brokers}: ${this.step} failed: ${this.reason}`
  }
}

export interface ConsumedRecord {
  readonly partition: number
  readonly offset: string
  readonly key: string | null
  readonly value: string | null
  readonly headers: Readonly<Record<string, string>>
}

export interface SmokeResult {
  readonly topic: string
  readonly groupId: string
  readonly produced: number
  readonly consumed: ReadonlyArray<ConsumedRecord>
  /** committed offset per partition, as read back by admin.fetchOffsets */
  readonly committed: ReadonlyMap<number, string>
  /** high watermark per partition, as read back by admin.fetchTopicOffsets */
  readonly highWatermarks: ReadonlyMap<number, string>
}

export const uniqueName = (prefix: string) => `${prefix}-${Date.now()}-${randomBytes(3).toString("hex")}`

const reasonOf = (cause: unknown) => (cause instanceof Error ? `${cause.name}: ${cause.message}` : String(cause))

/**
 * Short client timeouts and retries: a test wants a clear failure in seconds, not kafkajs' minute of retries.
 * `extra` adds or overrides settings, such as `sasl`, `ssl` or `retry`.
 */
export const testKafka = (brokers: string, clientId = "kafka-effect-test", extra: Partial<KafkaConfig> = {}) =>
  new Kafka({
    clientId,
    brokers: brokers.split(","),
    logLevel: logLevel.NOTHING,
    connectionTimeout: 3_000,
    requestTimeout: 10_000,
    retry: { retries: 3, initialRetryTime: 200, maxRetryTime: 2_000 },
    ...extra
  })

export const smokeRoundTrip = (options: {
  readonly brokers: string
  readonly records: number
  readonly partitions: number
  /** runs after every record is produced and before consuming starts */
  readonly afterProduce?: Effect.Effect<void> | undefined
  readonly timeout?: Duration.Input | undefined
}): Effect.Effect<SmokeResult, SmokeError, Scope.Scope> => {
  const { brokers } = options
  const call = <A>(step: string, f: () => Promise<A>) =>
    Effect.tryPromise({ try: f, catch: (cause) => new SmokeError({ brokers, step, reason: reasonOf(cause) }) })
  const kafka = testKafka(brokers, "kafka-effect-smoke")
  const topic = uniqueName("smoke")
  const groupId = uniqueName("smoke-group")

  return Effect.gen(function* () {
    const admin: Admin = yield* Effect.acquireRelease(
      call("admin connect", async () => {
        const admin = kafka.admin()
        await admin.connect()
        return admin
      }),
      (admin) => Effect.promise(() => admin.disconnect().catch(() => undefined))
    )
    yield* Effect.acquireRelease(
      call("create topic", () =>
        admin.createTopics({ topics: [{ topic, numPartitions: options.partitions }], waitForLeaders: true })
      ),
      // Best effort: when the broker is gone there is nothing left to clean.
      () => Effect.promise(() => admin.deleteTopics({ topics: [topic], timeout: 5_000 }).catch(() => undefined))
    )

    const producer: Producer = yield* Effect.acquireRelease(
      call("producer connect", async () => {
        const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1 })
        await producer.connect()
        return producer
      }),
      (producer) => Effect.promise(() => producer.disconnect().catch(() => undefined))
    )
    yield* call("produce", () =>
      producer.send({
        topic,
        acks: -1,
        messages: Array.from({ length: options.records }, (_, i) => ({
          key: `key-${i % 10}`,
          value: JSON.stringify({ index: i }),
          headers: { "x-index": String(i), "x-source": "smoke" }
        }))
      })
    )
    if (options.afterProduce) yield* options.afterProduce

    const consumed: Array<ConsumedRecord> = []
    const allConsumed = yield* Deferred.make<void, SmokeError>()
    const consumer: Consumer = yield* Effect.acquireRelease(
      call("consumer connect", async () => {
        const consumer = kafka.consumer({ groupId, retry: { retries: 3, initialRetryTime: 200, maxRetryTime: 2_000 } })
        await consumer.connect()
        return consumer
      }),
      (consumer) => Effect.promise(() => consumer.disconnect().catch(() => undefined))
    )
    // kafkajs reports a consumer that gave up as a CRASH event; without this the trip would wait for records
    // that never come.
    consumer.on(consumer.events.CRASH, ({ payload }) => {
      Deferred.doneUnsafe(
        allConsumed,
        Effect.fail(new SmokeError({ brokers, step: "consume", reason: reasonOf(payload.error) }))
      )
    })
    yield* call("subscribe", () => consumer.subscribe({ topics: [topic], fromBeginning: true }))
    yield* call("consumer run", () =>
      consumer.run({
        autoCommit: false,
        eachBatch: async ({ batch, heartbeat }) => {
          for (const message of batch.messages) {
            const headers: Record<string, string> = {}
            for (const [name, value] of Object.entries(message.headers ?? {})) headers[name] = String(value)
            consumed.push({
              partition: batch.partition,
              offset: message.offset,
              key: message.key?.toString("utf8") ?? null,
              value: message.value?.toString("utf8") ?? null,
              headers
            })
          }
          const last = batch.messages.at(-1)
          if (last !== undefined) {
            await consumer.commitOffsets([
              { topic, partition: batch.partition, offset: (BigInt(last.offset) + 1n).toString() }
            ])
          }
          await heartbeat()
          if (consumed.length >= options.records) Deferred.doneUnsafe(allConsumed, Effect.void)
        }
      })
    )
    yield* Deferred.await(allConsumed)
    yield* call("consumer stop", () => consumer.stop())

    const committed = new Map<number, string>()
    for (const { partitions } of yield* call("fetch committed offsets", () =>
      admin.fetchOffsets({ groupId, topics: [topic] })
    )) {
      for (const { partition, offset } of partitions) committed.set(partition, offset)
    }
    const highWatermarks = new Map<number, string>()
    for (const { partition, high } of yield* call("fetch topic offsets", () => admin.fetchTopicOffsets(topic))) {
      highWatermarks.set(partition, high)
    }
    return { topic, groupId, produced: options.records, consumed, committed, highWatermarks }
  }).pipe(
    Effect.timeoutOrElse({
      duration: options.timeout ?? "60 seconds",
      orElse: () =>
        Effect.fail(
          new SmokeError({
            brokers,
            step: "round trip",
            reason: `no result within ${Duration.format(Duration.fromInputUnsafe(options.timeout ?? "60 seconds"))}`
          })
        )
    })
  )
}
