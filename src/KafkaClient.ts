/**
 * KafkaClient: the port through which kafka-effect talks to Kafka — admin and producer primitives, Effect-native,
 * with typed errors that say whether trying again can help.
 *
 * Two implementations keep the same contract: the kafkajs engine (`kafka-effect/engines/kafkajs`, against real
 * brokers) and the in-memory broker for tests (`InMemoryKafka`). Everything above this module (Producer, Consumer,
 * Processor) depends on the port only, and the port on neither: `layerConfig` loads the engine when it is chosen.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import * as KafkaClient from "kafka-effect/KafkaClient"
 *
 * const topics = Effect.gen(function* () {
 *   const client = yield* KafkaClient.KafkaClient
 *   return yield* client.admin.listTopics
 * }).pipe(Effect.provide(KafkaClient.layerConfig))
 * ```
 */
import { Context, Duration, Effect, Layer, Metric, Schedule, Schema, type Scope, type Stream } from "effect"
import * as KafkaConfig from "./KafkaConfig.ts"
import * as Metrics from "./Metrics.ts"

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

/** No broker could be reached, or a connection broke. Retriable. */
export class ConnectionFailed extends Schema.TaggedError<ConnectionFailed>()("ConnectionFailed", {
  brokers: Schema.String,
  detail: Schema.String
}) {}

/** SASL authentication was refused: wrong credentials or mechanism. Not retriable: retrying cannot fix it. */
export class AuthenticationFailed extends Schema.TaggedError<AuthenticationFailed>()("AuthenticationFailed", {
  detail: Schema.String
}) {}

/** The TLS handshake failed (unknown CA, wrong host name, expired certificate). Not retriable. */
export class TlsFailed extends Schema.TaggedError<TlsFailed>()("TlsFailed", {
  detail: Schema.String
}) {}

/** A request did not complete within the request timeout. Retriable. */
export class RequestTimedOut extends Schema.TaggedError<RequestTimedOut>()("RequestTimedOut", {
  detail: Schema.String
}) {}

/** The topic does not exist (and the broker does not create topics on demand). Not retriable. */
export class UnknownTopic extends Schema.TaggedError<UnknownTopic>()("UnknownTopic", {
  topic: Schema.String
}) {}

/** The broker answered with a Kafka error code, e.g. NOT_LEADER_OR_FOLLOWER (retriable) or MESSAGE_TOO_LARGE. */
export class BrokerError extends Schema.TaggedError<BrokerError>()("BrokerError", {
  /** Kafka's name for the error code */
  type: Schema.String,
  retriable: Schema.Boolean,
  detail: Schema.String
}) {}

/**
 * A record batch that could not be decompressed: corrupt data (or a codec this process cannot load). Not retriable:
 * the same bytes fail every time, and skipping them loses records, which is the operator's decision. `firstOffset`
 * and `lastOffset` are the batch's; `partitions` the assigned partitions that read from there (one, when it could
 * be told).
 */
export class CorruptBatch extends Schema.TaggedError<CorruptBatch>()("CorruptBatch", {
  codec: Schema.String,
  detail: Schema.String,
  firstOffset: Schema.optional(Schema.String),
  lastOffset: Schema.optional(Schema.String),
  partitions: Schema.Array(Schema.Struct({ topic: Schema.String, partition: Schema.Number }))
}) {}

/** A codec's native package cannot load on this platform (no prebuilt binary for it). Not retriable. */
export class CodecUnavailable extends Schema.TaggedError<CodecUnavailable>()("CodecUnavailable", {
  codec: Schema.String,
  detail: Schema.String
}) {}

/** Anything else the client reported. */
export class ClientFailed extends Schema.TaggedError<ClientFailed>()("ClientFailed", {
  retriable: Schema.Boolean,
  detail: Schema.String
}) {}

export const KafkaErrorReason = Schema.Union([
  ConnectionFailed,
  AuthenticationFailed,
  TlsFailed,
  RequestTimedOut,
  UnknownTopic,
  BrokerError,
  CorruptBatch,
  CodecUnavailable,
  ClientFailed
])
export type KafkaErrorReason = typeof KafkaErrorReason.Type

const corruptBatchDetail = (reason: CorruptBatch) => {
  const offsets =
    reason.firstOffset === undefined
      ? ""
      : ` at offsets ${reason.firstOffset}–${reason.lastOffset ?? reason.firstOffset}`
  const where =
    reason.partitions.length === 0
      ? ""
      : ` of ${reason.partitions.map((tp) => `${tp.topic}[${tp.partition}]`).join(" or ")}`
  const past =
    reason.lastOffset === undefined
      ? "beyond the batch"
      : `to ${BigInt(reason.lastOffset) + 1n} (kafka-consumer-groups.sh --reset-offsets --to-offset ${BigInt(reason.lastOffset) + 1n})`
  return (
    `a ${reason.codec} record batch${where}${offsets} could not be decompressed: ${reason.detail}. ` +
    `The member stops rather than skip it; to go past it, move the group's offset ${past}`
  )
}

/**
 * A failed Kafka operation: which operation, on which topic and partition when known, and why (`reason`).
 * `retriable` tells whether the same operation may succeed if tried again.
 */
export class KafkaError extends Schema.TaggedError<KafkaError>()("KafkaError", {
  operation: Schema.String,
  topic: Schema.optional(Schema.String),
  partition: Schema.optional(Schema.Number),
  reason: KafkaErrorReason
}) {
  get retriable(): boolean {
    switch (this.reason._tag) {
      case "ConnectionFailed":
      case "RequestTimedOut":
        return true
      case "BrokerError":
      case "ClientFailed":
        return this.reason.retriable
      default:
        return false
    }
  }

  override get message() {
    const where =
      this.topic === undefined ? "" : ` on ${this.topic}${this.partition === undefined ? "" : `[${this.partition}]`}`
    const detail =
      this.reason._tag === "UnknownTopic"
        ? `topic ${this.reason.topic} does not exist`
        : this.reason._tag === "CorruptBatch"
          ? corruptBatchDetail(this.reason)
          : this.reason.detail
    return `${this.operation}${where} failed (${this.reason._tag}${this.retriable ? ", retriable" : ""}): ${detail}`
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The port
// ---------------------------------------------------------------------------------------------------------------

/** A header's value: text (sent as UTF-8) or bytes. */
export type HeaderValue = string | Uint8Array

/** Record headers by name; a name that occurs more than once has all its values, in order. */
export type Headers = Readonly<Record<string, HeaderValue | ReadonlyArray<HeaderValue>>>

/** A record to produce. A `null` key spreads records over partitions; a key pins them to one. */
export interface ProducerRecord {
  readonly topic: string
  readonly key: string | Uint8Array | null
  readonly value: string | Uint8Array | null
  readonly headers?: Headers | undefined
  /** an explicit partition, overriding the key's */
  readonly partition?: number | undefined
  /** epoch milliseconds; the broker's time when absent */
  readonly timestamp?: number | undefined
}

/** Where a produced record landed. `offset` is -1 when acks=0 (the broker does not answer). */
export interface RecordMetadata {
  readonly topic: string
  readonly partition: number
  readonly offset: bigint
}

export interface TopicSpec {
  readonly topic: string
  readonly partitions: number
  readonly replicationFactor?: number | undefined
  readonly configs?: Readonly<Record<string, string>> | undefined
}

export interface PartitionOffsets {
  readonly partition: number
  /** the log start offset */
  readonly low: bigint
  /** the high watermark: the offset the next record will get */
  readonly high: bigint
}

export interface CommittedOffset {
  readonly partition: number
  /** the next offset the group will read; `null` when the group has committed nothing there */
  readonly offset: bigint | null
}

export interface Admin {
  /** Creates the topics that do not exist yet; succeeds with the names it created. */
  readonly createTopics: (topics: ReadonlyArray<TopicSpec>) => Effect.Effect<ReadonlyArray<string>, KafkaError>
  readonly deleteTopics: (topics: ReadonlyArray<string>) => Effect.Effect<void, KafkaError>
  readonly listTopics: Effect.Effect<ReadonlyArray<string>, KafkaError>
  /** The number of partitions of a topic; fails with `UnknownTopic` when it does not exist. */
  readonly partitionCount: (topic: string) => Effect.Effect<number, KafkaError>
  readonly fetchTopicOffsets: (topic: string) => Effect.Effect<ReadonlyArray<PartitionOffsets>, KafkaError>
  readonly fetchCommittedOffsets: (
    groupId: string,
    topic: string
  ) => Effect.Effect<ReadonlyArray<CommittedOffset>, KafkaError>
}

export interface ProducerOptions {
  readonly idempotent: boolean
  readonly acks: KafkaConfig.Acks
  /** how long the broker may wait for replicas' acks before answering */
  readonly ackTimeout?: Duration.Duration | undefined
  /** the codec of the record batches it writes. Default none */
  readonly compression?: KafkaConfig.Compression | undefined
}

/** A connected producer: one `send` is one produce request (per broker) for all its records. */
export interface ProducerConnection {
  /**
   * Sends the records in one request and succeeds with each record's metadata, in the order given. Records of
   * one partition are written in the order given. On failure, none, some or all of the records may have been
   * written (at-least-once). One send at a time: the next send waits for this one's outcome. An idempotent
   * producer makes a retry safe per partition; the same records sent again at once (the very same array, or the
   * same record objects in the same order) may be dropped by the broker as copies of what it stored, where the
   * engine can keep the producer id and sequence numbers across the retry (kafkajs; @platformatic/kafka takes a
   * fresh id after a failed send, so a copy may be stored twice).
   */
  readonly send: (records: ReadonlyArray<ProducerRecord>) => Effect.Effect<ReadonlyArray<RecordMetadata>, KafkaError>
}

export interface TopicPartition {
  readonly topic: string
  readonly partition: number
}

export interface TopicPartitionOffset extends TopicPartition {
  /** for a commit: the next offset to read, one past the last record finished */
  readonly offset: bigint
}

/** A record as a consumer reads it. */
export interface ConsumedRecord {
  readonly topic: string
  readonly partition: number
  readonly offset: bigint
  readonly key: Uint8Array | null
  readonly value: Uint8Array | null
  /** each header's value; of a name that occurs more than once, the last (as Java's `lastHeader`) */
  readonly headers: Readonly<Record<string, Uint8Array>>
  /** every value, in order, of each header name that occurs more than once; absent when none does */
  readonly repeatedHeaders?: Readonly<Record<string, ReadonlyArray<Uint8Array>>> | undefined
  /** epoch milliseconds */
  readonly timestamp: number
}

/** Records of one partition, in offset order, as one fetch returned them. */
export interface ConsumerBatch {
  readonly topic: string
  readonly partition: number
  /** never empty */
  readonly records: ReadonlyArray<ConsumedRecord>
  /** the partition's high watermark when fetched: `highWatermark - 1 - last offset` records remain (the lag) */
  readonly highWatermark: bigint
}

/** What a batch handler can do while it runs. */
export interface BatchSession {
  /** tells the group this member is alive; call it during long work (it is cheap when not due) */
  readonly heartbeat: Effect.Effect<void, KafkaError>
  /** true once a rebalance is pending: the member should finish quickly so the group can move on */
  readonly isStale: Effect.Effect<boolean>
  /** false once the consumer is stopping */
  readonly isRunning: Effect.Effect<boolean>
}

/** What a batch handler tells the consumer when it did not take the whole batch. */
export interface BatchResult {
  /** the first offset not taken: the consumer fetches again from here (the rest of the batch is not skipped) */
  readonly resumeAt: bigint
}

/**
 * Handles one batch. When the handler returns, the consumer moves its position past the batch, or to `resumeAt`
 * if it returns a `BatchResult`; it calls the handler for a partition again only after the previous call for that
 * partition returned. Errors are the caller's to handle: the handler cannot fail.
 */
export type BatchHandler<R = never> = (
  batch: ConsumerBatch,
  session: BatchSession
  // biome-ignore lint/suspicious/noConfusingVoidType: handlers that took the whole batch return nothing
) => Effect.Effect<BatchResult | void, never, R>

/** This member's partitions after it joined (or rejoined) its group. */
export interface Assignment {
  readonly generation: number
  readonly partitions: ReadonlyArray<TopicPartition>
}

export interface ConsumerOptions {
  readonly groupId: string
  readonly topics: ReadonlyArray<string>
  /** where a partition without a committed offset starts: its first record (true) or its end (false) */
  readonly fromBeginning: boolean
  readonly fetchMinBytes?: number | undefined
  readonly fetchMaxBytes?: number | undefined
  /** how long the broker may hold a fetch to gather fetchMinBytes */
  readonly fetchMaxWait?: Duration.Duration | undefined
  readonly sessionTimeout?: Duration.Duration | undefined
  readonly heartbeatInterval?: Duration.Duration | undefined
  /** how many partitions' batches may be handled at the same time. Default 1 */
  readonly partitionsConsumedConcurrently?: number | undefined
  /**
   * `classic` (the default) or KIP-848's `consumer`: the broker assigns partitions incrementally, and a member
   * gives up only the partitions that move (no stop-the-world rebalance). An engine without it fails `consumer`.
   */
  readonly groupProtocol?: KafkaConfig.GroupProtocol | undefined
}

/**
 * A group member for the life of the scope. Commits are manual. A rebalance waits for running batch handlers to
 * return (kafkajs has no revoke callback), so work for a partition kept inside its handler is never lost to one.
 * After a rebalance each partition restarts from its committed offset: batches handled but not committed are
 * delivered again (at-least-once).
 */
export interface ConsumerConnection {
  /**
   * Joins the group and starts handling batches in the background until the scope closes; succeeds once started.
   * The handler runs with the services of the caller of `run`.
   */
  readonly run: <R>(handle: BatchHandler<R>) => Effect.Effect<void, KafkaError, R>
  /** Commits offsets for this group. Kafka checks the member's generation, not which partitions it owns. */
  readonly commit: (offsets: ReadonlyArray<TopicPartitionOffset>) => Effect.Effect<void, KafkaError>
  /** Stops fetching the partitions (a running handler finishes); `resume` starts again from the position. */
  readonly pause: (partitions: ReadonlyArray<TopicPartition>) => Effect.Effect<void>
  readonly resume: (partitions: ReadonlyArray<TopicPartition>) => Effect.Effect<void>
  /** the current assignment (generation 0 and no partitions before the first join) */
  readonly assignment: Effect.Effect<Assignment>
  /** every assignment from now on, the current one first */
  readonly assignments: Stream.Stream<Assignment>
  /** fails when the member stopped for good (a fatal client error); never succeeds */
  readonly crashed: Effect.Effect<never, KafkaError>
  /**
   * When the member last had an answer from the brokers (a fetch, a heartbeat or a commit), in epoch milliseconds:
   * a member whose brokers hang (they do not refuse, they do not answer) shows it only by this growing old.
   */
  readonly lastContact: Effect.Effect<number>
}

export class KafkaClient extends Context.Service<
  KafkaClient,
  {
    /** the bootstrap brokers, for logs */
    readonly brokers: ReadonlyArray<string>
    readonly admin: Admin
    /** A producer connection for the life of the scope; disconnected when the scope closes. */
    readonly producer: (options: ProducerOptions) => Effect.Effect<ProducerConnection, KafkaError, Scope.Scope>
    /** A consumer group member for the life of the scope; it leaves the group when the scope closes. */
    readonly consumer: (options: ConsumerOptions) => Effect.Effect<ConsumerConnection, KafkaError, Scope.Scope>
  }
>()("kafka-effect/KafkaClient") {}

// ---------------------------------------------------------------------------------------------------------------
// Reconnecting
// ---------------------------------------------------------------------------------------------------------------

/**
 * The reconnect policy: exponential from `initial` (doubling), each delay jittered to 80–120 %, never above `max`.
 * It recurs for as long as the error is retriable; `retryConnect` logs each attempt.
 */
export const reconnectSchedule = (options: {
  readonly initial: Duration.Duration
  readonly max: Duration.Duration
}): Schedule.Schedule<Duration.Duration> =>
  Schedule.exponential(options.initial, 2).pipe(
    Schedule.jittered,
    Schedule.modifyDelay(({ duration }) => Effect.succeed(Duration.min(duration, options.max)))
  )

/**
 * Runs `connect` until it succeeds, retrying retriable failures on `schedule` and logging each failed attempt
 * with the delay before the next; a non-retriable failure (bad credentials, TLS) ends it at once. `step` names a
 * start-up step other than connecting (creating topics, say), whose retries are not reconnects.
 */
export const retryConnect = <A, R>(
  connect: Effect.Effect<A, KafkaError, R>,
  schedule: Schedule.Schedule<Duration.Duration>,
  step?: string | undefined
): Effect.Effect<A, KafkaError, R> =>
  Effect.retry(connect, {
    schedule: schedule.pipe(
      // The schedule steps before `while` is asked, so a non-retriable error must not be logged as a retry.
      Schedule.tap(({ attempt, duration, input }: Schedule.Metadata<Duration.Duration, KafkaError>) => {
        if (!input.retriable) return Effect.void
        const next = Duration.format(Duration.millis(Math.round(Duration.toMillis(duration))))
        if (step !== undefined) {
          return Effect.logWarning(`${step} failed (attempt ${attempt}): ${input.message}; retrying in ${next}`)
        }
        // One line an attempt, saying where it tried and what to check (kafkajs' own lines about it are at debug).
        const line =
          input.reason._tag === "ConnectionFailed"
            ? `Kafka not reachable at ${input.reason.brokers} (attempt ${attempt}): ${input.reason.detail}; retrying in ${next} (is KAFKA_BROKERS right?)`
            : `Kafka not reachable (attempt ${attempt}): ${input.message}; retrying in ${next}`
        return Metric.update(Metrics.reconnects, 1).pipe(Effect.andThen(Effect.logWarning(line)))
      })
    ),
    while: (error: KafkaError) => error.retriable
  })

// ---------------------------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------------------------

/**
 * The client the environment configures (`KafkaConfig.connection`), over the engine `KAFKA_CLIENT` names, loaded only
 * now: the port imports no engine, and a user of one engine need not install the other.
 */
export const layerConfig: Layer.Layer<KafkaClient, KafkaError | KafkaConfig.KafkaConfigError> = Layer.unwrap(
  Effect.gen(function* () {
    const connection = yield* KafkaConfig.connection
    const engine = yield* loadEngine(connection.engine)
    return engine.layer(connection)
  })
)

/** What an engine module exports for `layerConfig`. */
interface EngineModule {
  readonly layer: (connection: KafkaConfig.ConnectionConfig) => Layer.Layer<KafkaClient, KafkaError>
}

const enginePackages: Readonly<Record<KafkaConfig.Engine, string>> = {
  kafkajs: "kafkajs@2.2.4",
  platformatic: "@platformatic/kafka@2.12.1"
}

/** Loads an engine's adapter (and so its package); a package that is not installed is named with its install. */
export const loadEngine = (engine: KafkaConfig.Engine): Effect.Effect<EngineModule, KafkaError> =>
  Effect.tryPromise({
    try: (): Promise<EngineModule> =>
      engine === "kafkajs" ? import("./engines/kafkajs/KafkaJS.ts") : import("./engines/platformatic/Platformatic.ts"),
    catch: (cause) =>
      new KafkaError({
        operation: "load engine",
        reason: new ClientFailed({
          retriable: false,
          detail: `KAFKA_CLIENT=${engine} could not be loaded (${String(cause)}); is it installed? npm install ${enginePackages[engine]}`
        })
      })
  })
