/**
 * The kafkajs engine behind the `KafkaClient` port (`layer`, or `KafkaClient.layerConfig`, which loads it when
 * chosen). Users depend on the port; this file depends on it, never the other way.
 */
import {
  Clock,
  Deferred,
  Duration,
  Effect,
  Exit,
  Layer,
  Option,
  Redacted,
  Schedule,
  type Scope,
  SubscriptionRef
} from "effect"
import type * as LogLevel from "effect/LogLevel"
import KafkaJS, {
  CompressionTypes,
  type IHeaders,
  Kafka,
  type Admin as KafkaJSAdmin,
  type Batch as KafkaJSBatch,
  type KafkaConfig as KafkaJSConfig,
  logLevel as KafkaJSLogLevel,
  type RecordMetadata as KafkaJSRecordMetadata,
  type LogEntry,
  type Message,
  Partitioners,
  type SASLOptions
} from "kafkajs"
import * as Codecs from "../../internal/codecs.ts"
import * as KafkaClient from "../../KafkaClient.ts"
import * as KafkaConfig from "../../KafkaConfig.ts"
import {
  asErrorLike as asErrorLikeOf,
  isProducerStateError,
  isTlsCode,
  leaderless,
  makeAttempt,
  notWritten,
  pendingOf,
  readPem,
  recordOffsets,
  retriableOnFreshProducer,
  type Built as SharedBuilt,
  sameRecords
} from "../shared.ts"

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

interface KafkaJSErrorLike {
  readonly name?: string
  readonly message?: string
  readonly retriable?: boolean
  readonly type?: string
  readonly code?: string | number
  readonly broker?: string
  readonly topic?: string
  readonly originalError?: unknown
  readonly cause?: unknown
  readonly errors?: ReadonlyArray<unknown>
}

const asErrorLike = (cause: unknown) => asErrorLikeOf<KafkaJSErrorLike>(cause)

/** kafkajs' wrappers around the error that decided the outcome, which they keep in `originalError` or `cause`. */
const wrappers = new Set(["KafkaJSNumberOfRetriesExceeded", "KafkaJSNonRetriableError"])

/**
 * The innermost error. kafkajs wraps the real one in "number of retries exceeded", and a retrier that gets that
 * from a nested retrier (the producer's around the broker pool's connect) wraps it again in a
 * `KafkaJSNonRetriableError`: a broker that refused connections for a few hundred milliseconds would otherwise
 * read as a permanent failure.
 */
const innermost = (cause: unknown): KafkaJSErrorLike => {
  let error = asErrorLike(cause)
  for (let depth = 0; depth < 5; depth++) {
    const inner =
      error.name !== undefined && wrappers.has(error.name) ? (error.originalError ?? error.cause) : undefined
    if (typeof inner !== "object" || inner === null || inner === error) break
    error = asErrorLike(inner)
  }
  return error
}

export const reasonOf = (cause: unknown, brokers: string): KafkaClient.KafkaErrorReason => {
  const error = innermost(cause)
  const detail = error.message ?? String(cause)
  if (error instanceof Codecs.CodecUnavailable) {
    return new KafkaClient.CodecUnavailable({ codec: error.codec, detail: error.message })
  }
  if (error instanceof Codecs.CodecError) {
    return new KafkaClient.CorruptBatch({
      codec: error.codec,
      detail: error.detail,
      ...(error.offsets !== undefined && {
        firstOffset: error.offsets.first.toString(),
        lastOffset: error.offsets.last.toString()
      }),
      partitions: []
    })
  }
  switch (error.name) {
    case "KafkaJSSASLAuthenticationError":
      return new KafkaClient.AuthenticationFailed({ detail })
    case "KafkaJSRequestTimeoutError":
      return new KafkaClient.RequestTimedOut({ detail })
    case "KafkaJSConnectionError":
    case "KafkaJSConnectionClosedError":
    case "KafkaJSBrokerNotFound":
    case "KafkaJSNoBrokerAvailableError":
    case "KafkaJSMetadataNotLoaded":
      return isTlsCode(error.code) || /certificate|SSL routines|TLS/i.test(detail)
        ? new KafkaClient.TlsFailed({ detail })
        : new KafkaClient.ConnectionFailed({ brokers, detail })
    case "KafkaJSTopicMetadataNotLoaded":
      return new KafkaClient.UnknownTopic({ topic: error.topic ?? "" })
    // kafkajs calls it non-retriable, but it says only that no broker named the group's coordinator just now (the
    // one asked was restarting, the coordinator still loading): GROUP_COORDINATOR_NOT_AVAILABLE, which it retries.
    case "KafkaJSGroupCoordinatorNotFound":
      return new KafkaClient.ClientFailed({ retriable: true, detail })
  }
  if (error.type === "UNKNOWN_TOPIC_OR_PARTITION" && error.topic !== undefined) {
    return new KafkaClient.UnknownTopic({ topic: error.topic })
  }
  if (typeof error.type === "string") {
    return new KafkaClient.BrokerError({ type: error.type, retriable: error.retriable === true, detail })
  }
  if (error.name === "KafkaJSAggregateError" && error.errors !== undefined && error.errors.length > 0) {
    return reasonOf(error.errors[0], brokers)
  }
  return new KafkaClient.ClientFailed({ retriable: error.retriable === true, detail })
}

/**
 * Disconnects a kafkajs client, waiting at most `bound` (1 s by default): kafkajs first waits for the requests in
 * flight, which a hung broker answers only at the request timeout (30 s by default), and closing must not wait that
 * long; what is left of the client is dropped with the process. On a broker that answers it takes milliseconds.
 */
const disconnect = (
  client: { readonly disconnect: () => Promise<void> },
  bound: Duration.Duration = Duration.seconds(1)
) => Effect.promise(() => client.disconnect().catch(() => undefined)).pipe(Effect.timeoutOption(bound), Effect.asVoid)

/**
 * kafkajs reads and writes gzip itself, and leaves snappy, lz4 and zstd to codecs registered in its process-wide
 * table: ours (`codecs.ts`) are registered once, when the first client is made.
 */
export const registerCodecs = () => {
  const kafkajsCodec = (codec: Codecs.Codec) => () => ({
    compress: (encoder: { readonly buffer: Buffer }) => codec.compress(encoder.buffer),
    decompress: (buffer: Buffer) => codec.decompress(buffer)
  })
  // Not a named import: Node's reading of kafkajs' CommonJS exports does not see this one.
  // kafkajs types its table with the four codecs it names; at run time it is indexed by any codec id (0–7).
  const table = KafkaJS.CompressionCodecs as Record<number, (typeof KafkaJS.CompressionCodecs)[CompressionTypes.GZIP]>
  // gzip too, instead of kafkajs' own (the same zlib): a corrupt gzip batch is then a CorruptBatch like the others.
  table[CompressionTypes.GZIP] = kafkajsCodec(Codecs.codecs.gzip)
  table[CompressionTypes.Snappy] = kafkajsCodec(Codecs.codecs.snappy)
  table[CompressionTypes.LZ4] = kafkajsCodec(Codecs.codecs.lz4)
  table[CompressionTypes.ZSTD] = kafkajsCodec(Codecs.codecs.zstd)
  // Kafka defines codecs 0–4; a batch claiming 5–7 (corrupt attributes) would otherwise be read as uncompressed
  // garbage, and fail somewhere past the decompression with nothing to say why.
  for (const id of [5, 6, 7]) {
    table[id] = () => ({
      compress: () => Promise.reject(new Error(`codec ${id} does not exist`)),
      decompress: (buffer: Buffer) => Promise.reject(Codecs.unknownCodec(id, buffer))
    })
  }
}

const compressionType: Readonly<Record<KafkaConfig.Compression, CompressionTypes>> = {
  none: CompressionTypes.None,
  gzip: CompressionTypes.GZIP,
  snappy: CompressionTypes.Snappy,
  lz4: CompressionTypes.LZ4,
  zstd: CompressionTypes.ZSTD
}

const attempt = makeAttempt(reasonOf)

// ---------------------------------------------------------------------------------------------------------------
// Logs: kafkajs → Effect logger
// ---------------------------------------------------------------------------------------------------------------

const levelOf = (level: KafkaJSLogLevel): LogLevel.Severity => {
  switch (level) {
    case KafkaJSLogLevel.ERROR:
      return "Error"
    case KafkaJSLogLevel.WARN:
      return "Warn"
    // Its own progress (starting, joining, stopping): what we log about the same steps says it for the user.
    case KafkaJSLogLevel.INFO:
      return "Debug"
    default:
      return "Debug"
  }
}

/**
 * kafkajs warns about this on every idempotent producer whose retries are bounded; ours are bounded on purpose
 * (retries of a failed send are the Producer's `Schedule`, which resends with the same sequence numbers).
 */
const mutedMessages = new Set(["Limiting retries for the idempotent producer may invalidate EoS guarantees"])

/**
 * What kafkajs logs happens inside an operation of ours, which reports its outcome itself at the level of who must
 * act: a dead letter or a send that failed for good at ERROR, a retry at WARN, a member that gives up as a failure of
 * `run`. So kafkajs' own lines go no higher than WARN, and the routine ones (a coordinator loading or moving, a
 * rebalance and the rejoin after it, a leader election, a topic its broker does not host yet) to INFO: every deploy,
 * scale-out and broker restart has them, and nobody must act on them.
 */
const routine =
  /coordinator is loading|not the correct coordinator|coordinator is not available|rebalanc|re-?join|not aware of this member|UNKNOWN_MEMBER_ID|ILLEGAL_GENERATION|leadership election|LEADER_NOT_AVAILABLE|not the leader for|NOT_LEADER|does not host this topic-partition|Restarting the consumer/i

/**
 * Connecting to a broker that does not answer: `retryConnect` logs one line an attempt, naming the brokers, and a
 * consumer or producer that loses its broker reports it as a failed operation; kafkajs' own lines (several an
 * attempt, with stack traces) are for debugging.
 */
const connecting =
  /Connection error|Connection timeout|ECONNREFUSED|ECONNRESET|EHOSTUNREACH|ENOTFOUND|Closed connection|Failed to connect|Connection closed/i

/** The level a kafkajs log entry goes to the Effect logger at. */
export const bridgedLevel = (
  level: KafkaJSLogLevel,
  message: string,
  fields: Record<string, unknown>
): LogLevel.Severity => {
  if (level !== KafkaJSLogLevel.ERROR && level !== KafkaJSLogLevel.WARN) return levelOf(level)
  const text = `${message} ${typeof fields.error === "string" ? fields.error : ""} ${typeof fields.type === "string" ? fields.type : ""}`
  if (connecting.test(text)) return "Debug"
  return routine.test(text) ? "Info" : "Warn"
}

const logCreator =
  (log: (effect: Effect.Effect<void>) => void) =>
  () =>
  ({ namespace, level, log: entry }: LogEntry) => {
    const { message, timestamp: _timestamp, logger: _logger, stack, ...fields } = entry
    if (mutedMessages.has(message)) return
    const severity = bridgedLevel(level, message, fields)
    // A stack trace says where inside kafkajs; worth reading only when debugging.
    log(
      Effect.logWithLevel(severity)(message).pipe(
        Effect.annotateLogs({
          kafkajs: namespace,
          ...fields,
          ...(severity === "Debug" && stack !== undefined && { stack })
        })
      )
    )
  }

// ---------------------------------------------------------------------------------------------------------------
// Connection settings
// ---------------------------------------------------------------------------------------------------------------

const sslOptions = (tls: KafkaConfig.TlsConfig) =>
  Effect.gen(function* () {
    const ca = Option.isSome(tls.caFile) ? [yield* readPem("KAFKA_TLS_CA_FILE", tls.caFile.value)] : undefined
    const cert = Option.isSome(tls.certFile) ? yield* readPem("KAFKA_TLS_CERT_FILE", tls.certFile.value) : undefined
    const key = Option.isSome(tls.keyFile) ? yield* readPem("KAFKA_TLS_KEY_FILE", tls.keyFile.value) : undefined
    return { rejectUnauthorized: true, ...(ca && { ca }), ...(cert && { cert }), ...(key && { key }) }
  })

const saslOptions = (sasl: KafkaConfig.SaslConfig): SASLOptions => ({
  mechanism: sasl.mechanism,
  username: sasl.username,
  // The only place a secret leaves its Redacted: the client needs the password itself.
  password: Redacted.value(sasl.password)
})

// ---------------------------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------------------------

const retryConnect = KafkaClient.retryConnect

/** The kafkajs client for the life of the scope; connecting waits for the brokers on the reconnect schedule. */
export const make = (
  connection: KafkaConfig.ConnectionConfig
): Effect.Effect<KafkaClient.KafkaClient["Service"], KafkaClient.KafkaError, Scope.Scope> =>
  Effect.gen(function* () {
    const brokers = connection.brokers.join(",")
    const context = yield* Effect.context<never>()
    const runLog = (effect: Effect.Effect<void>) => Effect.runForkWith(context)(effect)
    const config: KafkaJSConfig = {
      clientId: connection.clientId,
      brokers: [...connection.brokers],
      connectionTimeout: Duration.toMillis(connection.connectionTimeout),
      requestTimeout: Duration.toMillis(connection.requestTimeout),
      // kafkajs' own retries stay short: waiting for a broker is `reconnectSchedule`'s job, so that it is logged,
      // capped, and under TestClock in tests.
      retry: { retries: 2, initialRetryTime: 100, maxRetryTime: 1_000 },
      logLevel: KafkaJSLogLevel.INFO,
      logCreator: logCreator(runLog)
    }
    if (Option.isSome(connection.tls)) config.ssl = yield* sslOptions(connection.tls.value)
    if (Option.isSome(connection.sasl)) config.sasl = saslOptions(connection.sasl.value)
    if (
      Option.isSome(connection.sasl) &&
      connection.sasl.value.mechanism === "plain" &&
      Option.isNone(connection.tls)
    ) {
      // Allowed (SASL_PLAINTEXT listeners exist, on private networks), but never silently.
      yield* Effect.logWarning(
        "SASL PLAIN without TLS: the password crosses the network in clear text (set KAFKA_TLS=true, or use SCRAM)"
      )
    }
    registerCodecs()
    const kafka = new Kafka(config)
    const schedule = KafkaClient.reconnectSchedule({
      initial: connection.reconnectBackoff,
      max: connection.reconnectBackoffMax
    })

    // Waiting for the brokers can be interrupted (SIGTERM while they are away stops the program at once): each
    // connect below is interruptible and disconnects what it began when interrupted.
    const admin: KafkaJSAdmin = yield* Effect.acquireRelease(
      Effect.interruptible(
        retryConnect(
          Effect.suspend(() => {
            const admin = kafka.admin()
            return attempt(brokers, "connect", () => admin.connect()).pipe(
              Effect.andThen(attempt(brokers, "connect", () => admin.listTopics())),
              Effect.as(admin),
              Effect.onError(() => disconnect(admin))
            )
          }),
          schedule
        )
      ),
      (admin) => disconnect(admin)
    )
    yield* Effect.logInfo(`Connected to Kafka at ${brokers}`)

    const partitionCount = (topic: string) =>
      attempt(brokers, "fetch topic metadata", () => admin.fetchTopicMetadata({ topics: [topic] }), { topic }).pipe(
        Effect.map(({ topics }) => topics[0]?.partitions.length ?? 0)
      )

    const adminPort: KafkaClient.Admin = {
      // Retriable failures are tried again on the reconnect schedule, the whole step from the listing: replicas of
      // a deployment start together and create the same topics, and a broker can answer for a new topic's
      // partitions only once it hosts them ("This server does not host this topic-partition").
      createTopics: (topics) => {
        const missingOf = Effect.map(
          attempt(brokers, "list topics", () => admin.listTopics()),
          (existing) => topics.filter((spec) => !existing.includes(spec.topic))
        )
        // Every topic asked for, created by this call or by another replica a moment before, has a leader for
        // each of its partitions when this succeeds: a member that subscribes at once would otherwise be told
        // that the topic does not exist.
        // Waited for 30 s at most: a partition that stays leaderless (its only replica's broker is down) is not
        // a reason to keep the whole member from starting.
        const names = [...new Set(topics.map((spec) => spec.topic))]
        const leadersKnown = attempt(brokers, "fetch topic metadata", () =>
          admin.fetchTopicMetadata({ topics: names })
        ).pipe(
          Effect.flatMap(({ topics: found }) =>
            found.length === names.length &&
            found.every(({ partitions }) => partitions.length > 0 && partitions.every(({ leader }) => leader >= 0))
              ? Effect.void
              : Effect.fail(leaderless("some partitions have no leader yet"))
          ),
          Effect.retry({ schedule: Schedule.spaced("500 millis"), times: 60, while: (error) => error.retriable }),
          Effect.catchIf(
            (error) => error.reason._tag === "BrokerError" && error.reason.type === "LEADER_NOT_AVAILABLE",
            (error) =>
              Effect.logWarning(`topics created, but ${error.reason._tag === "BrokerError" ? error.reason.detail : ""}`)
          )
        )
        const created: Array<string> = []
        const createMissing = retryConnect(
          Effect.gen(function* () {
            const missing = yield* missingOf
            if (missing.length > 0) {
              yield* attempt(brokers, "create topics", () =>
                admin.createTopics({
                  waitForLeaders: true,
                  topics: missing.map((spec) => ({
                    topic: spec.topic,
                    numPartitions: spec.partitions,
                    replicationFactor: spec.replicationFactor ?? -1,
                    configEntries: Object.entries(spec.configs ?? {}).map(([name, value]) => ({ name, value }))
                  }))
                })
              )
              created.push(...missing.map((spec) => spec.topic))
            }
          }),
          schedule,
          "create topics"
        )
        return createMissing.pipe(Effect.andThen(leadersKnown), Effect.as(created))
      },
      deleteTopics: (topics) => attempt(brokers, "delete topics", () => admin.deleteTopics({ topics: [...topics] })),
      listTopics: attempt(brokers, "list topics", () => admin.listTopics()),
      partitionCount,
      fetchTopicOffsets: (topic) =>
        attempt(brokers, "fetch topic offsets", () => admin.fetchTopicOffsets(topic), { topic }).pipe(
          Effect.map((partitions) =>
            partitions
              .map(({ partition, low, high }) => ({ partition, low: BigInt(low), high: BigInt(high) }))
              .sort((a, b) => a.partition - b.partition)
          )
        ),
      fetchCommittedOffsets: (groupId, topic) =>
        attempt(brokers, "fetch committed offsets", () => admin.fetchOffsets({ groupId, topics: [topic] }), {
          topic
        }).pipe(
          Effect.map((topics) =>
            (topics[0]?.partitions ?? [])
              .map(({ partition, offset }) => ({ partition, offset: offset === "-1" ? null : BigInt(offset) }))
              .sort((a, b) => a.partition - b.partition)
          )
        )
    }

    const producer = (options: KafkaClient.ProducerOptions) =>
      Effect.gen(function* () {
        // A record without an explicit partition goes where kafkajs' default partitioner puts it (murmur2 of the
        // key, as the Java client); recording that choice is how such a record gets its own offset back from a
        // response that gives one base offset per partition. The KafkaProducer passes partitions explicitly, so on
        // its path nothing is recorded.
        const assigned = new WeakMap<Message, number>()
        const createPartitioner = stablePartitioner(assigned)
        const newClient = () =>
          kafka.producer({
            idempotent: options.idempotent,
            // One request at a time per broker: kafkajs keeps per-partition order only with 1.
            maxInFlightRequests: 1,
            allowAutoTopicCreation: false,
            createPartitioner,
            // The least kafkajs accepts for an idempotent producer; the Producer's Schedule does the rest.
            retry: { retries: 1, initialRetryTime: 100, maxRetryTime: 1_000 }
          })
        // After a failed send an idempotent kafkajs producer is reused only to send the same records again. When a
        // produce request fails, kafkajs rolls its sequence numbers back, although the broker may have stored the
        // batch (the request timed out, or the connection dropped, before the answer; or one partition appended
        // while another failed). The same records sent again go to the same partitions (the same Message objects,
        // so `stablePartitioner` keeps its choices) with the same sequence numbers, and the broker drops the copy
        // of a batch it had stored and answers with its offsets: stored once. Other records with those sequence
        // numbers would be lost instead: where a partition's share had the same first sequence and count as the
        // stored batch, the broker would take it for a retry of that batch, ack it with the stored batch's offsets
        // and drop it. So any other send after a failure, and any send after an error about the producer's id or
        // sequence, goes out on a fresh producer with a fresh id, whose sequences cannot collide; a batch that had
        // in fact been stored is then stored twice (at-least-once), never lost.
        let client = newClient()
        let tainted = false
        let failed: Built | undefined
        const connect = (c: ReturnType<typeof newClient>) =>
          retryConnect(
            attempt(brokers, "connect producer", () => c.connect()),
            schedule
          )
        yield* Effect.acquireRelease(
          Effect.interruptible(connect(client)).pipe(Effect.onInterrupt(() => disconnect(client))),
          () => disconnect(client)
        )
        const healthyClient = Effect.suspend(() => {
          if (!tainted) return Effect.succeed(client)
          const old = client
          const fresh = newClient()
          // One attempt: the send's own retry Schedule (and its bound) decides whether to try again. Reconnecting
          // until the broker is back would hold the send, which the Producer does not interrupt, and so its
          // callers and its shutdown, for as long as the broker is away.
          return attempt(brokers, "connect producer", () => fresh.connect()).pipe(
            Effect.tapError(() => disconnect(fresh)),
            Effect.tap(() =>
              Effect.sync(() => {
                client = fresh
                tainted = false
                void old.disconnect().catch(() => undefined)
              })
            ),
            Effect.as(fresh)
          )
        })
        const timeout = options.ackTimeout === undefined ? undefined : Duration.toMillis(options.ackTimeout)
        const compression = compressionType[options.compression ?? "none"]
        const build = (records: ReadonlyArray<KafkaClient.ProducerRecord>): Built => {
          const messages = new Array<Message>(records.length)
          for (let index = 0; index < records.length; index++) {
            const record = records[index] as KafkaClient.ProducerRecord
            const message: Message = { key: toBuffer(record.key), value: toBuffer(record.value) }
            if (record.headers !== undefined) message.headers = toKafkaJSHeaders(record.headers)
            if (record.partition !== undefined) message.partition = record.partition
            if (record.timestamp !== undefined) message.timestamp = String(record.timestamp)
            messages[index] = message
          }
          return { records, messages, acked: new Array(records.length) }
        }
        // One produce request of the records of `built` at `places`; what answers is recorded in `built.acked`.
        const request = (current: ReturnType<typeof newClient>, built: Built, { places, topicMessages }: Request) =>
          attempt(
            brokers,
            "produce",
            () =>
              current.sendBatch({
                topicMessages,
                acks: options.acks,
                compression,
                ...(timeout !== undefined && { timeout })
              }),
            topicMessages.length === 1 ? { topic: topicMessages[0]?.topic } : undefined
          ).pipe(
            Effect.flatMap((responses) => {
              const unanswered = recordAnswers(built, places, assigned, responses, options.acks)
              return unanswered === undefined ? Effect.void : Effect.fail(notWritten(unanswered))
            })
          )
        const send = (records: ReadonlyArray<KafkaClient.ProducerRecord>) =>
          Effect.suspend(() => {
            const resend = failed !== undefined && sameRecords(failed.records, records) ? failed : undefined
            if (failed !== undefined && resend === undefined && options.idempotent) tainted = true
            failed = undefined
            const built = resend ?? build(records)
            // A first try is one request. Sent again, only what has not been acked goes, a request per partition:
            // kafkajs reports a request that failed on one broker as a failure of all of it, although the other
            // brokers' shares were written; sent apart, a partition that answers is acked and not sent again.
            const requests =
              resend === undefined
                ? [requestOf(built, Array.from(records.keys()))]
                : byPartition(built, pendingOf(built), assigned)
            return Effect.flatMap(healthyClient, (current) =>
              Effect.forEach(requests, (one) => Effect.exit(request(current, built, one)), {
                concurrency: "unbounded"
              })
            ).pipe(
              Effect.flatMap((exits) => {
                const failure = exits.find(Exit.isFailure)
                return failure === undefined
                  ? Effect.succeed(built.acked as Array<KafkaClient.RecordMetadata>)
                  : Effect.failCause(failure.cause)
              }),
              // kafkajs gives these up (not retriable): the broker forgot the producer id (it was idle longer than
              // producer.id.expiration.ms, or its segments were deleted) or its sequence. The next try goes out on a
              // fresh producer, with a fresh id, which cures both.
              Effect.mapError((error) => (options.idempotent ? retriableOnFreshProducer(error) : error)),
              Effect.tapError((error) =>
                Effect.sync(() => {
                  if (options.idempotent && isProducerStateError(error)) tainted = true
                  failed = built
                })
              )
            )
          })
        return { send } satisfies KafkaClient.ProducerConnection
      })

    const consumer = (options: KafkaClient.ConsumerOptions) =>
      Effect.gen(function* () {
        if (options.groupProtocol === "consumer") {
          return yield* new KafkaClient.KafkaError({
            operation: "consume",
            reason: new KafkaClient.ClientFailed({
              retriable: false,
              detail:
                "kafkajs has only the classic group protocol: set KAFKA_CONSUMER_GROUP_PROTOCOL=classic, or KAFKA_CLIENT=platformatic for KIP-848's"
            })
          })
        }
        const firstTopic = options.topics.length === 1 ? options.topics[0] : undefined
        const assignment = yield* SubscriptionRef.make<KafkaClient.Assignment>({ generation: 0, partitions: [] })
        const crashed = yield* Deferred.make<never, KafkaClient.KafkaError>()
        const client = kafka.consumer({
          groupId: options.groupId,
          allowAutoTopicCreation: false,
          ...(options.sessionTimeout && { sessionTimeout: Duration.toMillis(options.sessionTimeout) }),
          ...(options.heartbeatInterval && { heartbeatInterval: Duration.toMillis(options.heartbeatInterval) }),
          ...(options.fetchMinBytes !== undefined && { minBytes: options.fetchMinBytes }),
          ...(options.fetchMaxBytes !== undefined && {
            maxBytes: options.fetchMaxBytes,
            // Half kafkajs' default per partition (1 MiB), or the total if smaller: a batch is held in memory until
            // its batch call returns, so this bounds what a member holds per partition (the memory benchmark's peak
            // RSS fell by about 25 MB with no loss of throughput), and smaller batches let a rebalance through sooner.
            maxBytesPerPartition: Math.min(options.fetchMaxBytes, 524_288)
          }),
          ...(options.fetchMaxWait && { maxWaitTimeInMs: Duration.toMillis(options.fetchMaxWait) }),
          // kafkajs restarting itself would hide the crash from the Consumer, whose Schedule restarts it instead.
          retry: { retries: 5, initialRetryTime: 100, maxRetryTime: 2_000, restartOnFailure: async () => false }
        })
        let joins = 0
        let disconnecting = false
        // kafkajs' own isStale() only covers seeks. A heartbeat refused because the group is rebalancing is how a
        // member learns of a rebalance; from then until it rejoins, its batch calls are stale.
        let rebalancing = false
        // kafkajs finds the group's coordinator only when it joins: one that died or moved stays its target for
        // heartbeats and commits, which then fail for ever. A batch call that waited for its commit would never
        // return, and nothing would make kafkajs join again. So a heartbeat or commit that cannot reach the
        // coordinator makes batch calls stale: they return, kafkajs' own heartbeat fails, and the member rejoins
        // (or crashes after its retries and is restarted), finding the coordinator anew. An answer clears it.
        let coordinatorLost = false
        const noteCoordinator = (error: KafkaClient.KafkaError) =>
          Effect.sync(() => {
            const reason = error.reason
            if (reason._tag === "ConnectionFailed") coordinatorLost = true
            else if (reason._tag === "BrokerError" && coordinatorErrors.has(reason.type)) coordinatorLost = true
          })
        // The partitions of the member's current generation, as `topic\u0000partition`.
        let owned = new Set<string>()
        client.on(client.events.GROUP_JOIN, ({ payload }) => {
          rebalancing = false
          coordinatorLost = false
          joins++
          const partitions = Object.entries(payload.memberAssignment).flatMap(([topic, list]) =>
            list.map((partition) => ({ topic, partition }))
          )
          owned = new Set(partitions.map(({ topic, partition }) => `${topic}\u0000${partition}`))
          runLog(SubscriptionRef.set(assignment, { generation: joins, partitions }))
        })
        client.on(client.events.CRASH, ({ payload }) => {
          if (!payload.restart) {
            const reason = reasonOf(payload.error, brokers)
            runLog(
              Effect.flatMap(
                reason._tag === "CorruptBatch"
                  ? locateCorruptBatch(reason)
                  : Effect.succeed<KafkaClient.KafkaErrorReason>(reason),
                (located) => {
                  // A corrupt batch located in one partition names it; anything else names the first topic.
                  const only = located._tag === "CorruptBatch" ? located.partitions : []
                  const where =
                    only.length === 1 && only[0] !== undefined
                      ? { topic: only[0].topic, partition: only[0].partition }
                      : firstTopic !== undefined
                        ? { topic: firstTopic }
                        : {}
                  return Deferred.fail(
                    crashed,
                    new KafkaClient.KafkaError({ operation: "consume", ...where, reason: located })
                  )
                }
              ).pipe(Effect.asVoid)
            )
          }
        })
        // The time of the last answer from the brokers: kafkajs reports each fetch, heartbeat and commit it made.
        let lastContact = yield* Clock.currentTimeMillis
        const contact = ({ timestamp }: { readonly timestamp: number }) => {
          lastContact = Math.max(lastContact, timestamp)
        }
        client.on(client.events.FETCH, contact)
        client.on(client.events.HEARTBEAT, contact)
        client.on(client.events.COMMIT_OFFSETS, contact)
        // The next offset each partition fetches from, as far as this member can tell: after a batch call, its last
        // offset taken + 1; after a join, unknown (the group's committed offset). To name the partition of a corrupt
        // batch, whose offsets alone are known.
        const positions = new Map<string, bigint>()
        client.on(client.events.GROUP_JOIN, () => positions.clear())
        const locateCorruptBatch = (reason: KafkaClient.CorruptBatch) =>
          Effect.gen(function* () {
            const { partitions } = yield* SubscriptionRef.get(assignment)
            if (reason.firstOffset === undefined) return new KafkaClient.CorruptBatch({ ...reason, partitions })
            const first = BigInt(reason.firstOffset)
            const last = BigInt(reason.lastOffset ?? reason.firstOffset)
            const committed = new Map<string, bigint>()
            if (partitions.some((tp) => !positions.has(`${tp.topic}\u0000${tp.partition}`))) {
              const topics = [...new Set(partitions.map((tp) => tp.topic))]
              const fetched = yield* Effect.option(
                attempt(brokers, "fetch committed offsets", () =>
                  admin.fetchOffsets({ groupId: options.groupId, topics })
                )
              )
              for (const { topic, partitions: list } of Option.getOrElse(fetched, () => [])) {
                for (const { partition, offset } of list) committed.set(`${topic}\u0000${partition}`, BigInt(offset))
              }
            }
            // A partition with no commit yet may start anywhere: it stays a candidate.
            const candidates = partitions.filter((tp) => {
              const key = `${tp.topic}\u0000${tp.partition}`
              const at = positions.get(key) ?? committed.get(key) ?? -1n
              return at < 0n || (at >= first && at <= last)
            })
            return new KafkaClient.CorruptBatch({
              ...reason,
              partitions: candidates.length > 0 ? candidates : partitions
            })
          })
        yield* Effect.acquireRelease(
          Effect.interruptible(
            retryConnect(
              attempt(brokers, "connect consumer", () => client.connect()),
              schedule
            )
          ).pipe(Effect.onInterrupt(() => disconnect(client))),
          // disconnect stops fetching, waits for running batch handlers (done by now: KafkaConsumer's shutdown
          // waited for them), and leaves the group: 3 s at most, as a member that leaves without a word holds its
          // partitions from the others until its session times out.
          () =>
            Effect.suspend(() => {
              disconnecting = true
              return disconnect(client, Duration.seconds(3))
            })
        )
        yield* attempt(
          brokers,
          "subscribe",
          () => client.subscribe({ topics: [...options.topics], fromBeginning: options.fromBeginning }),
          { topic: firstTopic }
        )
        const run = <R>(handle: KafkaClient.BatchHandler<R>) =>
          Effect.flatMap(Effect.context<R>(), (callerContext) =>
            attempt(brokers, "consumer run", () =>
              client.run({
                autoCommit: false,
                // Offsets are resolved here, after the handler: a handler that stops early (a rebalance is pending)
                // gets the rest of its batch fetched again instead of skipped.
                eachBatchAutoResolve: false,
                partitionsConsumedConcurrently: options.partitionsConsumedConcurrently ?? 1,
                eachBatch: async ({ batch, heartbeat, isStale, isRunning, resolveOffset }) => {
                  if (batch.isEmpty()) return
                  // A batch fetched before a rejoin can start after it (kafkajs queues fetched batches): one of a
                  // partition this member no longer has is neither handled (its new owner handles it) nor resolved
                  // (kafkajs' new offset manager knows nothing of the partition and would throw, crashing the
                  // consumer).
                  if (!owned.has(`${batch.topic}\u0000${batch.partition}`)) return
                  // kafkajs may rejoin while this call runs: a fetch that finds a partition's leader moved rejoins
                  // from that broker's fetcher, whatever the other fetchers' batch calls are doing. Any join since
                  // this call began makes it stale.
                  const joinsAtStart = joins
                  const result = await Effect.runPromiseWith(callerContext)(
                    handle(toConsumerBatch(batch), {
                      heartbeat: attempt(brokers, "heartbeat", heartbeat).pipe(
                        // Accepted: the member's generation is current. A refusal that needed no rejoin (the
                        // coordinator moved, kafkajs found the new one) must not leave every later call stale.
                        Effect.tap(() =>
                          Effect.sync(() => {
                            rebalancing = false
                            coordinatorLost = false
                          })
                        ),
                        Effect.tapError((error) =>
                          Effect.sync(() => {
                            if (error.reason._tag === "BrokerError" && rebalancingErrors.has(error.reason.type)) {
                              rebalancing = true
                            }
                          }).pipe(Effect.andThen(noteCoordinator(error)))
                        )
                      ),
                      isStale: Effect.sync(() => rebalancing || coordinatorLost || joins !== joinsAtStart || isStale()),
                      isRunning: Effect.sync(isRunning)
                    })
                  )
                  const lastTaken = result === undefined ? BigInt(batch.lastOffset()) : result.resumeAt - 1n
                  // After a rejoin the offsets are the new generation's, fetched from the committed ones: resolving
                  // this call's (maybe for a partition lost) would move or break them.
                  if (joins === joinsAtStart && lastTaken >= BigInt(batch.firstOffset() ?? "0")) {
                    resolveOffset(lastTaken.toString())
                    positions.set(`${batch.topic}\u0000${batch.partition}`, lastTaken + 1n)
                  }
                }
              })
            )
          )
        const commit = (offsets: ReadonlyArray<KafkaClient.TopicPartitionOffset>) =>
          disconnecting
            ? // kafkajs silently drops a commit once it has begun to stop; say so instead of pretending it worked.
              Effect.fail(
                new KafkaClient.KafkaError({
                  operation: "commit",
                  reason: new KafkaClient.ClientFailed({ retriable: false, detail: "the consumer is stopping" })
                })
              )
            : attempt(brokers, "commit", () =>
                client.commitOffsets(
                  offsets.map(({ topic, partition, offset }) => ({ topic, partition, offset: offset.toString() }))
                )
              ).pipe(Effect.tapError(noteCoordinator))
        const byTopic = (partitions: ReadonlyArray<KafkaClient.TopicPartition>) => {
          const topics = new Map<string, Array<number>>()
          for (const { topic, partition } of partitions) topics.set(topic, [...(topics.get(topic) ?? []), partition])
          return [...topics].map(([topic, list]) => ({ topic, partitions: list }))
        }
        return {
          run,
          commit,
          pause: (partitions) => Effect.sync(() => client.pause(byTopic(partitions))),
          resume: (partitions) => Effect.sync(() => client.resume(byTopic(partitions))),
          assignment: SubscriptionRef.get(assignment),
          assignments: SubscriptionRef.changes(assignment),
          crashed: Deferred.await(crashed),
          lastContact: Effect.sync(() => lastContact)
        } satisfies KafkaClient.ConsumerConnection
      })

    return KafkaClient.KafkaClient.of({ brokers: connection.brokers, admin: adminPort, producer, consumer })
  })

const toBuffer = (value: string | Uint8Array | null): Buffer | null =>
  value === null ? null : typeof value === "string" ? Buffer.from(value, "utf8") : Buffer.from(value)

const toKafkaJSHeaders = (headers: KafkaClient.Headers) => {
  const out: Record<string, Buffer | Array<Buffer>> = {}
  for (const [name, value] of Object.entries(headers)) {
    // Arrays first: a Uint8Array from another realm fails instanceof, and walking its bytes would be wrong.
    out[name] = Array.isArray(value)
      ? value.map((one: KafkaClient.HeaderValue) => toBuffer(one) ?? Buffer.alloc(0))
      : (toBuffer(value as KafkaClient.HeaderValue) ?? Buffer.alloc(0))
  }
  return out
}

export { retriableOnFreshProducer }

/** Answers that say the member must look for its group's coordinator again (kafkajs' names). */
const coordinatorErrors = new Set(["NOT_COORDINATOR_FOR_GROUP", "GROUP_COORDINATOR_NOT_AVAILABLE"])

/** The errors kafkajs treats as "the group is rebalancing: rejoin". */
const rebalancingErrors = new Set([
  "REBALANCE_IN_PROGRESS",
  "ILLEGAL_GENERATION",
  "NOT_COORDINATOR_FOR_GROUP",
  // fenced: the group has dropped this member, which must join again
  "UNKNOWN_MEMBER_ID"
])

const headerBytes = (value: Buffer | string | undefined): Uint8Array =>
  value === undefined ? new Uint8Array(0) : typeof value === "string" ? Buffer.from(value, "utf8") : value

// Kafka allows a header name more than once; kafkajs gives an array then. `headers` holds the last, as lastHeader();
// `repeatedHeaders` all of them.
const lastHeaderValue = (value: IHeaders[string]): Uint8Array =>
  headerBytes(Array.isArray(value) ? value.at(-1) : value)

/** The headers of the many records that have none: one frozen object instead of one per record. */
const noHeaders: Readonly<Record<string, Uint8Array>> = Object.freeze({})

const toConsumerBatch = (batch: KafkaJSBatch): KafkaClient.ConsumerBatch => {
  const messages = batch.messages
  const records = new Array<KafkaClient.ConsumedRecord>(messages.length)
  for (let i = 0; i < messages.length; i++) {
    const message = messages[i] as KafkaJSBatch["messages"][number]
    let headers: Record<string, Uint8Array> | undefined
    let repeated: Record<string, ReadonlyArray<Uint8Array>> | undefined
    const received = message.headers ?? {}
    for (const name in received) {
      headers ??= {}
      const value = received[name]
      headers[name] = lastHeaderValue(value)
      if (Array.isArray(value) && value.length > 1) {
        repeated ??= {}
        repeated[name] = value.map(headerBytes)
      }
    }
    records[i] = {
      topic: batch.topic,
      partition: batch.partition,
      offset: BigInt(message.offset),
      key: message.key ?? null,
      value: message.value ?? null,
      headers: headers ?? noHeaders,
      ...(repeated !== undefined && { repeatedHeaders: repeated }),
      timestamp: Number(message.timestamp)
    }
  }
  return { topic: batch.topic, partition: batch.partition, highWatermark: BigInt(batch.highWatermark), records }
}

/** A send's records, their kafkajs messages and what has been acked of them (see `Shared.Built`). */
export type Built = SharedBuilt<Message>

/** Records of a `Built` (their places in it) as one kafkajs request: their messages by topic, in order. */
export interface Request {
  readonly places: ReadonlyArray<number>
  readonly topicMessages: Array<{ readonly topic: string; readonly messages: Array<Message> }>
}

/** The records of `built` at `places` as one request. */
export const requestOf = (built: Built, places: ReadonlyArray<number>): Request => {
  const byTopic = new Map<string, Array<Message>>()
  let lastTopic: string | undefined
  let lastList: Array<Message> = []
  for (const index of places) {
    const topic = (built.records[index] as KafkaClient.ProducerRecord).topic
    if (topic !== lastTopic) {
      lastTopic = topic
      lastList = byTopic.get(topic) ?? []
      byTopic.set(topic, lastList)
    }
    lastList.push(built.messages[index] as Message)
  }
  return { places, topicMessages: [...byTopic].map(([topic, messages]) => ({ topic, messages })) }
}

/**
 * The records of `built` at `places` as one request per partition, in order within each; as one request if one of
 * them has no partition yet (kafkajs never got as far as choosing it).
 */
export const byPartition = (
  built: Built,
  places: ReadonlyArray<number>,
  assigned: WeakMap<Message, number>
): Array<Request> => {
  const groups = new Map<string, Array<number>>()
  for (const index of places) {
    const message = built.messages[index] as Message
    const partition = message.partition ?? assigned.get(message)
    if (partition === undefined) return [requestOf(built, places)]
    const key = `${partition} ${(built.records[index] as KafkaClient.ProducerRecord).topic}`
    const group = groups.get(key)
    if (group === undefined) groups.set(key, [index])
    else group.push(index)
  }
  return [...groups.values()].map((group) => requestOf(built, group))
}

/**
 * kafkajs' default partitioner (murmur2 of the key, as the Java client; round robin for null keys) that records
 * each choice in `assigned` and keeps it: kafkajs partitions every message again on each of its internal retries,
 * and a null key's round robin would move it to another partition, one whose broker may have answered already
 * and is not asked again (its records would then not be written).
 */
export const stablePartitioner = (assigned: WeakMap<Message, number>) => () => {
  const partition = Partitioners.DefaultPartitioner()
  return (args: Parameters<typeof partition>[0]) => {
    const previous = assigned.get(args.message)
    if (previous !== undefined) return previous
    const chosen = partition(args)
    if (args.message.partition === undefined) assigned.set(args.message, chosen)
    return chosen
  }
}

/**
 * Records kafkajs' answer to one `sendBatch` of the records of `built` at `places` (in that order) in `built.acked`:
 * each record's offset is the base offset of its partition's share plus its place in that share. Returns the first
 * record whose partition has no response, if any. That is not an ack: kafkajs resolves a send whose internal retry
 * skipped a partition (its leader moved to a broker that had already answered, which is not asked again), and that
 * partition's records were not written. With acks=0 nobody answers: the offsets are -1.
 */
export const recordAnswers = (
  built: Built,
  places: ReadonlyArray<number>,
  assigned: WeakMap<Message, number>,
  responses: ReadonlyArray<KafkaJSRecordMetadata>,
  acks: number
): KafkaClient.TopicPartition | undefined => {
  const baseOffsets = new Map<string, bigint>()
  for (const response of responses) {
    baseOffsets.set(`${response.topicName} ${response.partition}`, BigInt(response.baseOffset ?? "-1"))
  }
  const partitionOf = (index: number) => {
    const message = built.messages[index] as Message
    return message.partition ?? assigned.get(message) ?? -1
  }
  return recordOffsets(built, places, partitionOf, baseOffsets, acks)
}

/**
 * kafkajs against real brokers. Connecting waits for the brokers on `KafkaClient.reconnectSchedule` (a process
 * started before its broker waits instead of exiting); kafkajs' own logs go to the Effect logger.
 *
 * @example
 * ```ts
 * import * as KafkaJS from "kafka-effect/engines/kafkajs"
 * const Client = KafkaJS.layer(connection)   // or KafkaClient.layerConfig, which picks the engine from the environment
 * ```
 */
export const layer = (
  connection: KafkaConfig.ConnectionConfig
): Layer.Layer<KafkaClient.KafkaClient, KafkaClient.KafkaError> =>
  Layer.effect(KafkaClient.KafkaClient, make(connection))

/** `layer` configured from the environment (`KafkaConfig.connection`). */
export const layerConfig: Layer.Layer<KafkaClient.KafkaClient, KafkaClient.KafkaError | KafkaConfig.KafkaConfigError> =
  Layer.unwrap(Effect.map(KafkaConfig.connection, layer))
