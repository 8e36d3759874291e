/**
 * Helpers for real-broker tests: our layers pointed at a given broker, and a plain kafkajs reader that reads a
 * topic back independently of the code under test.
 */
import { randomBytes } from "node:crypto"
import { ConfigProvider, Data, Duration, Effect, Layer, Schedule } from "effect"
import { Kafka, logLevel } from "kafkajs"
import * as KafkaClient from "../../src/KafkaClient.ts"
import * as KafkaConfig from "../../src/KafkaConfig.ts"

export const uniqueName = (prefix: string) => `${prefix}-${Date.now()}-${randomBytes(3).toString("hex")}`

/**
 * The engine the suite runs on: `KAFKA_CLIENT` of the test run (`KAFKA_CLIENT=platformatic npm test`), kafkajs when
 * unset. Every layer and program a test makes uses it, unless the test names an engine itself.
 */
export const testEngine: Record<string, string> =
  process.env.KAFKA_CLIENT === undefined ? {} : { KAFKA_CLIENT: process.env.KAFKA_CLIENT }

/** Our configuration as the environment would give it, with `env` on top of `KAFKA_BROKERS` and the test engine. */
export const configFor = (brokers: string, env: Record<string, string> = {}) =>
  ConfigProvider.layer(ConfigProvider.fromEnv({ env: { KAFKA_BROKERS: brokers, ...testEngine, ...env } }))

/**
 * The environment of a consumer program on `topic`, as the tests run it: group `<topic>-group`, retry topics and DLQ
 * named after the topic and created at start, commits every 200 ms, JSON logs; `extra` on top.
 */
export const consumerProgramEnv = (brokers: string, topic: string, extra: Record<string, string> = {}) => ({
  KAFKA_BROKERS: brokers,
  KAFKA_CONSUMER_TOPIC: topic,
  KAFKA_CONSUMER_GROUP_ID: `${topic}-group`,
  KAFKA_RETRY_TOPIC_PREFIX: `${topic}-retry`,
  KAFKA_DLQ_TOPIC: `${topic}-dlq`,
  KAFKA_CREATE_TOPICS: "true",
  KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
  LOG_FORMAT: "json",
  ...extra
})

/** `KafkaClient.layerConfig` against `brokers`, configured by `env`. */
export const clientLayer = (brokers: string, env: Record<string, string> = {}) =>
  KafkaClient.layerConfig.pipe(Layer.provide(configFor(brokers, env)))

export const connectionFor = (brokers: string, env: Record<string, string> = {}) =>
  KafkaConfig.connection.pipe(Effect.provide(configFor(brokers, env)))

export interface ReadRecord {
  readonly partition: number
  readonly offset: bigint
  readonly key: string | null
  readonly value: string | null
  readonly headers: Readonly<Record<string, string>>
}

export class ReadError extends Data.TaggedError("ReadError")<{ readonly message: string }> {}

const plainKafka = (brokers: string) =>
  new Kafka({
    clientId: "kafka-effect-test-reader",
    brokers: brokers.split(","),
    logLevel: logLevel.NOTHING,
    connectionTimeout: 3_000,
    retry: { retries: 3, initialRetryTime: 200, maxRetryTime: 2_000 }
  })

/**
 * Creates a topic with plain kafkajs admin (independent of our admin), and waits until the broker answers for every
 * partition: a broker that has just started takes about 2 s to host its first new topic, answering "This server
 * does not host this topic-partition" meanwhile (kafkajs' own wait for leaders fails on that).
 */
export const createTopic = (brokers: string, topic: string, partitions: number) =>
  Effect.tryPromise({
    try: async () => {
      const admin = plainKafka(brokers).admin()
      await admin.connect()
      try {
        // Creating again is harmless: it exists or it does not.
        await admin.createTopics({ topics: [{ topic, numPartitions: partitions }], waitForLeaders: false })
        const metadata = await admin.fetchTopicMetadata({ topics: [topic] })
        const found = metadata.topics[0]?.partitions ?? []
        if (found.length !== partitions || found.some((p) => p.leader < 0)) throw new Error("not every partition led")
      } finally {
        await admin.disconnect()
      }
    },
    catch: (cause) => new ReadError({ message: `create topic ${topic} on ${brokers}: ${String(cause)}` })
  }).pipe(Effect.retry({ schedule: Schedule.spaced("250 millis"), times: 120 }))

/** What `groupId` has committed on each partition of `topic` (-1 for none), read with plain kafkajs admin. */
export const committedOffsets = (brokers: string, groupId: string, topic: string) =>
  Effect.tryPromise({
    try: async () => {
      const admin = plainKafka(brokers).admin()
      await admin.connect()
      try {
        const [offsets] = await admin.fetchOffsets({ groupId, topics: [topic] })
        return new Map((offsets?.partitions ?? []).map((p) => [p.partition, BigInt(p.offset)]))
      } finally {
        await admin.disconnect()
      }
    },
    catch: (cause) => new ReadError({ message: `committed offsets of ${groupId} on ${topic}: ${String(cause)}` })
  }).pipe(
    // The group's coordinator can be loading or moving (a broker that has just been thawed or restarted): ask again.
    Effect.retry({ schedule: Schedule.spaced("500 millis"), times: 20 })
  )

/**
 * Waits until `groupId` has committed every partition of `topic` up to its end, polling every 250 ms. Fails when its
 * commits stop moving for `stall` (not after a fixed time: a group that keeps committing on a busy machine is slow,
 * not stuck), saying where each partition stands.
 */
export const awaitCommittedToEnd = (brokers: string, groupId: string, topic: string, stall: Duration.Input) => {
  let lastSeen = "nothing read yet"
  let lastSum = -1n
  let movedAt = Date.now()
  const look = Effect.tryPromise({
    try: async () => {
      const admin = plainKafka(brokers).admin()
      await admin.connect()
      try {
        const ends = await admin.fetchTopicOffsets(topic)
        const [committed] = await admin.fetchOffsets({ groupId, topics: [topic] })
        const at = new Map((committed?.partitions ?? []).map((p) => [p.partition, p.offset]))
        lastSeen = ends.map((end) => `p${end.partition} ${at.get(end.partition)}/${end.high}`).join(", ")
        const sum = [...at.values()].reduce((total, offset) => total + BigInt(offset), 0n)
        if (sum > lastSum) {
          lastSum = sum
          movedAt = Date.now()
        }
        // An empty partition has nothing to commit.
        return ends.every((end) => end.high === end.low || at.get(end.partition) === end.high)
      } finally {
        await admin.disconnect()
      }
    },
    catch: (cause) => new ReadError({ message: `committed offsets of ${groupId} on ${topic}: ${String(cause)}` })
  }).pipe(
    // A coordinator loading or moving answers with an error for a moment: that is not yet, not never.
    Effect.retry({ schedule: Schedule.spaced("500 millis"), times: 20 })
  )
  const stallMillis = Duration.toMillis(Duration.fromInputUnsafe(stall))
  return Effect.gen(function* () {
    while (!(yield* look)) {
      if (Date.now() - movedAt > stallMillis) {
        return yield* new ReadError({
          message: `${groupId}'s commits on ${topic} stopped short of the end (committed/end: ${lastSeen})`
        })
      }
      yield* Effect.sleep("250 millis")
    }
  })
}

/**
 * Reads every record of `topic` up to its high watermarks with a plain kafkajs consumer in a fresh group,
 * so what the test checks does not go through the code under test.
 */
export const readTopic = (brokers: string, topic: string) =>
  Effect.tryPromise({
    try: async () => {
      const kafka = plainKafka(brokers)
      const admin = kafka.admin()
      await admin.connect()
      const offsets = await admin.fetchTopicOffsets(topic)
      await admin.disconnect()
      const remaining = new Map(
        offsets.filter((p) => BigInt(p.high) > BigInt(p.low)).map((p) => [p.partition, BigInt(p.high)])
      )
      // Keyed by position: kafkajs hands a batch over again after it restarts the reader or rebalances it (the
      // reader commits nothing), and a record read twice is not a record stored twice.
      const records = new Map<string, ReadRecord>()
      if (remaining.size === 0) return []
      const consumer = kafka.consumer({ groupId: uniqueName("reader"), maxBytes: 50 * 1024 * 1024 })
      await consumer.connect()
      await consumer.subscribe({ topics: [topic], fromBeginning: true })
      await new Promise<void>((resolve, reject) => {
        // kafkajs restarts a consumer after a retriable crash (a coordinator still loading, say); only a crash
        // it gives up on is the reader's failure.
        consumer.on(consumer.events.CRASH, ({ payload }) => {
          if (!payload.restart) reject(payload.error)
        })
        consumer
          .run({
            autoCommit: false,
            eachBatch: async ({ batch }) => {
              for (const message of batch.messages) {
                const headers: Record<string, string> = {}
                for (const [name, value] of Object.entries(message.headers ?? {})) headers[name] = String(value)
                records.set(`${batch.partition}:${message.offset}`, {
                  partition: batch.partition,
                  offset: BigInt(message.offset),
                  key: message.key?.toString("utf8") ?? null,
                  value: message.value?.toString("utf8") ?? null,
                  headers
                })
                const high = remaining.get(batch.partition)
                if (high !== undefined && BigInt(message.offset) + 1n >= high) remaining.delete(batch.partition)
              }
              if (remaining.size === 0) resolve()
            }
          })
          .catch(reject)
      })
      await consumer.disconnect()
      return [...records.values()]
    },
    catch: (cause) => new ReadError({ message: `read back ${topic} from ${brokers}: ${String(cause)}` })
  }).pipe(
    // A broker that has just been thawed or restarted answers NOT_LEADER or NOT_COORDINATOR for a moment: read again.
    Effect.retry({ schedule: Schedule.spaced("500 millis"), times: 10 }),
    Effect.timeoutOrElse({
      duration: "90 seconds",
      orElse: () => Effect.fail(new ReadError({ message: `read back ${topic}: timed out` }))
    })
  )

/** Polls `check` every 200 ms until it holds, failing after `timeout`. */
export const eventually = <E, R>(
  check: Effect.Effect<boolean, E, R>,
  what: string,
  timeout: Duration.Input = "60 seconds"
) =>
  check.pipe(
    Effect.repeat({ schedule: Schedule.spaced("200 millis"), until: (done) => done }),
    Effect.timeoutOrElse({ duration: timeout, orElse: () => Effect.die(new Error(`timed out waiting for ${what}`)) })
  )
