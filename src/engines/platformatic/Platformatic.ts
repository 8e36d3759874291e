/**
 * The @platformatic/kafka engine behind the `KafkaClient` port (`layer`, or `KafkaClient.layerConfig` with
 * `KAFKA_CLIENT=platformatic`, which loads it only then). Users depend on the port; this file depends on it.
 *
 * - Admin and producer are the library's `Admin` and `Producer`. The adapter partitions every record itself
 *   (murmur2 as Java for keys, round robin for null keys): the library's default partitioner is not Java's, and its
 *   compatible one sends every keyless record to partition 0.
 * - The consumer uses the library's `Consumer` for group membership only (join, sync, its background heartbeats) and
 *   fetches itself through the library's `fetch` on a connection pool of its own, so that it keeps the port's
 *   contract: per-partition batches with their high watermark, per-partition pause, `resumeAt`, and a rebalance that
 *   waits for running batch calls (through the `protocolsMetadata` hook the library awaits before every JoinGroup).
 *   Commits are single OffsetCommit requests with the member's generation: the library's own `commit` rejoins and
 *   commits again under the new generation, which could commit a partition the member lost.
 */

import { randomUUID } from "node:crypto"
import {
  type Connection,
  ConnectionPool,
  compressionsAlgorithmsByBitmask,
  consumerGroupHeartbeatV1,
  FetchIsolationLevels,
  findCoordinatorV4,
  type GroupAssignment,
  heartbeatV4,
  ListOffsetTimestamps,
  type MessageToProduce,
  offsetCommitV8,
  offsetCommitV9,
  Admin as PltAdmin,
  Consumer as PltConsumer,
  Producer as PltProducer,
  ProtocolError,
  type RecordsBatch
} from "@platformatic/kafka"
import {
  Cause,
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
  Semaphore,
  SubscriptionRef
} from "effect"
import * as ChangeSignal from "../../internal/changeSignal.ts"
import { partitionForKey } from "../../internal/murmur2.ts"
import * as KafkaClient from "../../KafkaClient.ts"
import * as KafkaConfig from "../../KafkaConfig.ts"
import {
  asErrorLike as asErrorLikeOf,
  type Built,
  isTlsCode,
  leaderless,
  makeAttempt,
  notWritten,
  pendingOf,
  readPem,
  recordOffsets,
  retriableOnFreshProducer,
  sameRecords
} from "../shared.ts"

type FetchResponse = Awaited<ReturnType<PltConsumer["fetch"]>>
type FetchRequestTopic = Parameters<PltConsumer["fetch"]>[0]["topics"][number]

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

interface ErrorLike {
  readonly name?: string
  readonly message?: string
  readonly code?: string
  readonly apiId?: string
  readonly canRetry?: boolean
  readonly cause?: unknown
  readonly errors?: ReadonlyArray<unknown>
}

const asErrorLike = (cause: unknown) => asErrorLikeOf<ErrorLike>(cause)

/** Every error of the library's tree (MultipleErrors hold several, NetworkErrors a cause), depth first. */
const errorTree = (cause: unknown): Array<ErrorLike> => {
  const out: Array<ErrorLike> = []
  const visit = (error: unknown, depth: number) => {
    if (depth > 8 || typeof error !== "object" || error === null) return
    const like = asErrorLike(error)
    out.push(like)
    for (const inner of like.errors ?? []) visit(inner, depth + 1)
    if (like.cause !== undefined) visit(like.cause, depth + 1)
  }
  visit(cause, 0)
  return out
}

/** A batch our wrapper of the library's codecs could not decompress, with its header when it could be read. */
class DecompressFailed extends Error {
  readonly codec: string
  readonly detail: string
  readonly offsets: { readonly first: bigint; readonly last: bigint } | undefined
  constructor(codec: string, detail: string, offsets: { readonly first: bigint; readonly last: bigint } | undefined) {
    super(`${codec} decompression failed: ${detail}`)
    this.codec = codec
    this.detail = detail
    this.offsets = offsets
  }
}

const codecNames: Readonly<Record<string, string>> = { 1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd" }

/** A record batch's header is 61 bytes; its compressed records follow it. */
const BATCH_HEADER = 61

/**
 * The offsets of the batch whose compressed records are `data`, read from the header right before them when `data`
 * is a view of the fetched bytes (and checked: magic 2, and the header's length matching `data`'s).
 */
export const batchOffsetsOf = (data: unknown): { first: bigint; last: bigint } | undefined => {
  if (!(data instanceof Uint8Array) || data.byteOffset < BATCH_HEADER) return undefined
  const view = new DataView(data.buffer, data.byteOffset - BATCH_HEADER, BATCH_HEADER)
  const length = view.getInt32(8)
  const magic = view.getInt8(16)
  if (magic !== 2 || length !== BATCH_HEADER - 12 + data.byteLength) return undefined
  const first = view.getBigInt64(0)
  return { first, last: first + BigInt(view.getInt32(23)) }
}

let codecsWrapped = false

/**
 * The library decompresses while it parses a fetch response, and a corrupt batch surfaces as whatever the codec
 * threw (for snappy and lz4 a bare WebAssembly trap). Its codecs are wrapped once so that the error names the codec
 * and, when it can, the batch's offsets.
 */
const wrapCodecs = () => {
  if (codecsWrapped) return
  codecsWrapped = true
  for (const [bitmask, algorithm] of Object.entries(compressionsAlgorithmsByBitmask)) {
    const codec = codecNames[bitmask]
    if (codec === undefined) continue
    const original = algorithm.decompressSync
    ;(algorithm as { decompressSync: typeof original }).decompressSync = (data) => {
      try {
        return original(data)
      } catch (cause) {
        throw new DecompressFailed(codec, cause instanceof Error ? cause.message : String(cause), batchOffsetsOf(data))
      }
    }
  }
}

/** Decompression failures, which the library throws raw while it parses a fetch response. */
const corruptCodec = (error: ErrorLike): string | undefined => {
  if (error instanceof DecompressFailed) return error.codec
  if (error.code === "Z_DATA_ERROR" || error.code === "Z_BUF_ERROR") return "gzip"
  if (typeof error.code === "string" && error.code.startsWith("ZSTD_")) return "zstd"
  if (error.name === "RuntimeError" && /unreachable|out of bounds/.test(error.message ?? "")) return "snappy or lz4"
  if (error.code === "PLT_KFK_UNSUPPORTED_COMPRESSION") return "unknown"
  return undefined
}

export const reasonOf = (cause: unknown, brokers: string): KafkaClient.KafkaErrorReason => {
  const tree = errorTree(cause)
  const top = tree[0] ?? { message: String(cause) }
  const detail = [...new Set(tree.map((error) => error.message).filter((m) => m !== undefined && m !== ""))].join(": ")
  for (const error of tree) {
    const codec = corruptCodec(error)
    if (codec !== undefined) {
      const offsets = error instanceof DecompressFailed ? error.offsets : undefined
      return new KafkaClient.CorruptBatch({
        codec,
        detail: error instanceof DecompressFailed ? error.detail : (error.message ?? detail),
        ...(offsets !== undefined && { firstOffset: offsets.first.toString(), lastOffset: offsets.last.toString() }),
        partitions: []
      })
    }
  }
  if (tree.some((error) => error.code === "PLT_KFK_AUTHENTICATION")) {
    return new KafkaClient.AuthenticationFailed({ detail })
  }
  if (
    tree.some((error) => isTlsCode(error.code) || /TLS handshake|requires TLS|certificate/i.test(error.message ?? ""))
  ) {
    return new KafkaClient.TlsFailed({ detail })
  }
  for (const error of tree) {
    const unknown = /^Unknown topic (.+)\.$/.exec(error.message ?? "")
    if (unknown?.[1] !== undefined) return new KafkaClient.UnknownTopic({ topic: unknown[1] })
  }
  const protocol = tree.find((error) => error.code === "PLT_KFK_PROTOCOL" && error.apiId !== undefined)
  if (protocol?.apiId !== undefined) {
    return new KafkaClient.BrokerError({ type: protocol.apiId, retriable: protocol.canRetry !== false, detail })
  }
  if (tree.some((error) => /timed out/i.test(error.message ?? "") && error.code === "PLT_KFK_NETWORK")) {
    return tree.some((error) => /^Connection to .* timed out/.test(error.message ?? ""))
      ? new KafkaClient.ConnectionFailed({ brokers, detail })
      : new KafkaClient.RequestTimedOut({ detail })
  }
  if (
    tree.some((error) => error.code === "PLT_KFK_NETWORK" || /ECONNREFUSED|ECONNRESET|EPIPE/.test(error.code ?? ""))
  ) {
    return new KafkaClient.ConnectionFailed({ brokers, detail })
  }
  return new KafkaClient.ClientFailed({ retriable: top.canRetry === true, detail })
}

const attempt = makeAttempt(reasonOf)

/** Closes a client, waiting at most `bound`: a hung broker must not hold a shutdown. */
const close = (run: () => Promise<unknown>, bound: Duration.Duration = Duration.seconds(1)) =>
  Effect.promise(() => run().catch(() => undefined)).pipe(Effect.timeoutOption(bound), Effect.asVoid)

// ---------------------------------------------------------------------------------------------------------------
// Connection settings
// ---------------------------------------------------------------------------------------------------------------

const connectionOptions = (connection: KafkaConfig.ConnectionConfig) =>
  Effect.gen(function* () {
    const options: Record<string, unknown> = {
      clientId: connection.clientId,
      bootstrapBrokers: [...connection.brokers],
      connectTimeout: Duration.toMillis(connection.connectionTimeout),
      requestTimeout: Duration.toMillis(connection.requestTimeout),
      // The library's own retries stay short: waiting for a broker is `reconnectSchedule`'s job, and a failed send
      // is retried by the Producer's Schedule.
      retries: 2,
      retryDelay: 100
    }
    if (Option.isSome(connection.tls)) {
      const tls = connection.tls.value
      const ca = Option.isSome(tls.caFile) ? [yield* readPem("KAFKA_TLS_CA_FILE", tls.caFile.value)] : undefined
      const cert = Option.isSome(tls.certFile) ? yield* readPem("KAFKA_TLS_CERT_FILE", tls.certFile.value) : undefined
      const key = Option.isSome(tls.keyFile) ? yield* readPem("KAFKA_TLS_KEY_FILE", tls.keyFile.value) : undefined
      options.tls = { rejectUnauthorized: true, ...(ca && { ca }), ...(cert && { cert }), ...(key && { key }) }
      options.tlsServerName = true
    }
    if (Option.isSome(connection.sasl)) {
      const sasl = connection.sasl.value
      const password = sasl.password
      options.sasl = {
        mechanism: sasl.mechanism.toUpperCase(),
        username: sasl.username,
        // A function: the secret leaves its Redacted only when the library authenticates.
        password: () => Redacted.value(password)
      }
      if (sasl.mechanism === "plain" && Option.isNone(connection.tls)) {
        yield* Effect.logWarning(
          "SASL PLAIN without TLS: the password crosses the network in clear text (set KAFKA_TLS=true, or use SCRAM)"
        )
      }
    }
    return options
  })

// ---------------------------------------------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------------------------------------------

const toBuffer = (value: string | Uint8Array | null): Buffer | undefined =>
  value === null
    ? undefined
    : typeof value === "string"
      ? Buffer.from(value, "utf8")
      : Buffer.from(value.buffer, value.byteOffset, value.byteLength)

/** Headers as the library writes them: a Map with a distinct key Buffer per occurrence, so a name can repeat. */
const toHeaders = (headers: KafkaClient.Headers): Map<Buffer, Buffer> => {
  const out = new Map<Buffer, Buffer>()
  for (const [name, value] of Object.entries(headers)) {
    const values = Array.isArray(value) ? value : [value as KafkaClient.HeaderValue]
    for (const one of values) out.set(Buffer.from(name, "utf8"), toBuffer(one) ?? Buffer.alloc(0))
  }
  return out
}

const noHeaders: Readonly<Record<string, Uint8Array>> = Object.freeze({})
const empty = new Uint8Array(0)

const CONTROL_BATCH = 0x20
const TRANSACTIONAL_BATCH = 0x10

interface AbortedTransaction {
  readonly producerId: bigint
  readonly firstOffset: bigint
}

/** A control batch's record key is a version (int16) and a type (int16): 0 ABORT, 1 COMMIT. */
const isAbortMarker = (batch: RecordsBatch) => {
  const key = batch.records[0]?.key
  return key !== null && key !== undefined && key.length >= 4 && key.readInt16BE(2) === 0
}
const LOG_APPEND_TIME = 0x08

/** The records of one partition's fetched batches from `from` on, control batches left out. */
export const toRecords = (
  topic: string,
  partition: number,
  batches: ReadonlyArray<RecordsBatch>,
  from: bigint,
  abortedTransactions: ReadonlyArray<AbortedTransaction> | null = null
): Array<KafkaClient.ConsumedRecord> => {
  const records: Array<KafkaClient.ConsumedRecord> = []
  // READ_COMMITTED as the Java client reads it: the transactions the broker says were aborted, by the offset they
  // began at; a producer's transactional batches are left out from there until its ABORT marker.
  const pending = [...(abortedTransactions ?? [])].sort((a, b) => (a.firstOffset < b.firstOffset ? -1 : 1))
  const abortedProducers = new Set<bigint>()
  for (const batch of batches) {
    const lastOffset = batch.firstOffset + BigInt(batch.lastOffsetDelta)
    while (pending.length > 0 && (pending[0] as AbortedTransaction).firstOffset <= lastOffset) {
      abortedProducers.add((pending.shift() as AbortedTransaction).producerId)
    }
    if ((batch.attributes & CONTROL_BATCH) !== 0) {
      if (isAbortMarker(batch)) abortedProducers.delete(batch.producerId)
      continue
    }
    if ((batch.attributes & TRANSACTIONAL_BATCH) !== 0 && abortedProducers.has(batch.producerId)) continue
    const logAppendTime = (batch.attributes & LOG_APPEND_TIME) !== 0
    for (const record of batch.records) {
      const offset = batch.firstOffset + BigInt(record.offsetDelta)
      // A compressed batch starts where it starts, maybe before the offset asked for.
      if (offset < from) continue
      let headers: Record<string, Uint8Array> | undefined
      let repeated: Record<string, Array<Uint8Array>> | undefined
      for (const [key, value] of record.headers) {
        const name = key === null ? "" : key.toString("utf8")
        const bytes = value ?? empty
        headers ??= {}
        if (headers[name] !== undefined) {
          repeated ??= {}
          repeated[name] ??= [headers[name]]
          repeated[name].push(bytes)
        }
        headers[name] = bytes
      }
      records.push({
        topic,
        partition,
        offset,
        key: record.key,
        value: record.value,
        headers: headers ?? noHeaders,
        ...(repeated !== undefined && { repeatedHeaders: repeated }),
        timestamp: Number(logAppendTime ? batch.maxTimestamp : batch.firstTimestamp + record.timestampDelta)
      })
    }
  }
  return records
}

/** One past the last offset the batches cover, control batches included: where to fetch next when none is a record. */
const endOf = (batches: ReadonlyArray<RecordsBatch>): bigint | undefined => {
  const last = batches.at(-1)
  return last === undefined ? undefined : last.firstOffset + BigInt(last.lastOffsetDelta) + 1n
}

const key = (topic: string, partition: number) => `${topic}\u0000${partition}`

/**
 * A corrupt batch of one fetch named by the partitions it can be in: those asked for from an offset inside the
 * batch, else every one asked for. The error then names the partition when there is one.
 */
export const located = (reason: KafkaClient.KafkaErrorReason, asked: ReadonlyMap<string, bigint>) => {
  if (reason._tag !== "CorruptBatch") return { reason }
  const all = [...asked.keys()].map((k) => {
    const [topic = "", partition = "0"] = k.split("\u0000")
    return { topic, partition: Number(partition) }
  })
  const first = reason.firstOffset === undefined ? undefined : BigInt(reason.firstOffset)
  const last = reason.lastOffset === undefined ? first : BigInt(reason.lastOffset)
  const inside =
    first === undefined || last === undefined
      ? all
      : all.filter((tp) => {
          const at = asked.get(key(tp.topic, tp.partition)) ?? -1n
          return at >= first && at <= last
        })
  const partitions = inside.length > 0 ? inside : all
  const only = partitions.length === 1 ? partitions[0] : undefined
  return {
    ...(only !== undefined && { topic: only.topic, partition: only.partition }),
    reason: new KafkaClient.CorruptBatch({ ...reason, partitions })
  }
}

/** The library's engines field: `>= 22.22.0 || >= 24.6.0` (read as 22.22+ in 22, 24.6+ from 24 on). */
export const nodeSupported = (version: string): boolean => {
  const [major = 0, minor = 0] = version.split(".").map(Number)
  return major === 22 ? minor >= 22 : major === 24 ? minor >= 6 : major > 24
}

// ---------------------------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------------------------

/** The @platformatic/kafka client for the life of the scope; connecting waits for the brokers on the reconnect schedule. */
export const make = (
  connection: KafkaConfig.ConnectionConfig
): Effect.Effect<KafkaClient.KafkaClient["Service"], KafkaClient.KafkaError, Scope.Scope> =>
  Effect.gen(function* () {
    if (!nodeSupported(process.versions.node)) {
      return yield* new KafkaClient.KafkaError({
        operation: "load engine",
        reason: new KafkaClient.ClientFailed({
          retriable: false,
          detail: `@platformatic/kafka needs Node.js 22.22 or newer in 22, or 24.6 or newer; this is ${process.version} (or set KAFKA_CLIENT=kafkajs)`
        })
      })
    }
    wrapCodecs()
    const brokers = connection.brokers.join(",")
    const base = yield* connectionOptions(connection)
    const schedule = KafkaClient.reconnectSchedule({
      initial: connection.reconnectBackoff,
      max: connection.reconnectBackoffMax
    })
    const admin = yield* Effect.acquireRelease(
      Effect.sync(() => new PltAdmin(base as unknown as ConstructorParameters<typeof PltAdmin>[0])),
      (admin) => close(() => admin.close())
    )
    yield* Effect.interruptible(
      KafkaClient.retryConnect(
        attempt(brokers, "connect", () => admin.metadata({ topics: [], retries: 0, forceUpdate: true })),
        schedule
      )
    )
    yield* Effect.logInfo(`Connected to Kafka at ${brokers}`)

    const metadataOf = (topics: ReadonlyArray<string>) =>
      attempt(brokers, "fetch topic metadata", () => admin.metadata({ topics: [...topics], forceUpdate: true }), {
        topic: topics.length === 1 ? topics[0] : undefined
      })

    const partitionCount = (topic: string) =>
      Effect.map(metadataOf([topic]), (metadata) => metadata.topics.get(topic)?.partitionsCount ?? 0)

    const adminPort: KafkaClient.Admin = {
      createTopics: (topics) => {
        const names = [...new Set(topics.map((spec) => spec.topic))]
        const created: Array<string> = []
        const createMissing = KafkaClient.retryConnect(
          Effect.gen(function* () {
            const existing = new Set(yield* attempt(brokers, "list topics", () => admin.listTopics()))
            const missing = topics.filter((spec) => !existing.has(spec.topic) && !created.includes(spec.topic))
            // One call per topic: configs apply to a whole call, and an existing topic fails a whole call.
            for (const spec of missing) {
              const made = yield* attempt(brokers, "create topics", () =>
                admin.createTopics({
                  topics: [spec.topic],
                  partitions: spec.partitions,
                  replicas: spec.replicationFactor ?? -1,
                  configs: Object.entries(spec.configs ?? {}).map(([name, value]) => ({ name, value }))
                })
              ).pipe(
                Effect.as(true),
                // Created a moment ago by another replica of the deployment: not ours to report.
                Effect.catchIf(
                  (error) => error.reason._tag === "BrokerError" && error.reason.type === "TOPIC_ALREADY_EXISTS",
                  () => Effect.succeed(false)
                )
              )
              if (made) created.push(spec.topic)
            }
          }),
          schedule,
          "create topics"
        )
        // Every topic asked for has a leader for each partition when this succeeds (30 s at most).
        const leadersKnown = metadataOf(names).pipe(
          // A topic created a moment ago, that this broker does not know yet: not there yet, as a leader.
          Effect.catchIf(
            (error) => error.reason._tag === "UnknownTopic",
            (error) => Effect.fail(leaderless(error.message))
          ),
          Effect.flatMap((metadata) =>
            names.every((name) => {
              const topic = metadata.topics.get(name)
              return topic !== undefined && topic.partitionsCount > 0 && topic.partitions.every((p) => p.leader >= 0)
            })
              ? Effect.void
              : Effect.fail(leaderless("some partitions have no leader yet"))
          ),
          Effect.retry({ schedule: Schedule.spaced("500 millis"), times: 60, while: (error) => error.retriable }),
          Effect.catchIf(
            (error) => error.reason._tag === "BrokerError" && error.reason.type === "LEADER_NOT_AVAILABLE",
            () => Effect.logWarning("topics created, but some partitions have no leader yet")
          )
        )
        return createMissing.pipe(Effect.andThen(leadersKnown), Effect.as(created))
      },
      deleteTopics: (topics) => attempt(brokers, "delete topics", () => admin.deleteTopics({ topics: [...topics] })),
      listTopics: attempt(brokers, "list topics", () => admin.listTopics({ includeInternals: true })),
      partitionCount,
      fetchTopicOffsets: (topic) =>
        Effect.gen(function* () {
          const count = yield* partitionCount(topic)
          const partitions = Array.from({ length: count }, (_, partition) => partition)
          const listed = (timestamp: bigint) =>
            attempt(
              brokers,
              "fetch topic offsets",
              () =>
                admin.listOffsets({
                  topics: [
                    { name: topic, partitions: partitions.map((partitionIndex) => ({ partitionIndex, timestamp })) }
                  ],
                  isolationLevel: FetchIsolationLevels.READ_UNCOMMITTED
                }),
              { topic }
            ).pipe(
              Effect.map((topics) => {
                const byPartition = new Map<number, bigint>()
                for (const p of topics[0]?.partitions ?? []) byPartition.set(p.partitionIndex, p.offset)
                return byPartition
              })
            )
          const [low, high] = yield* Effect.all([
            listed(ListOffsetTimestamps.EARLIEST),
            listed(ListOffsetTimestamps.LATEST)
          ])
          return partitions.map((partition) => ({
            partition,
            low: low.get(partition) ?? 0n,
            high: high.get(partition) ?? 0n
          }))
        }),
      fetchCommittedOffsets: (groupId, topic) =>
        Effect.gen(function* () {
          const count = yield* partitionCount(topic)
          const partitionIndexes = Array.from({ length: count }, (_, partition) => partition)
          const groups = yield* attempt(
            brokers,
            "fetch committed offsets",
            () =>
              admin.listConsumerGroupOffsets({ groups: [{ groupId, topics: [{ name: topic, partitionIndexes }] }] }),
            { topic }
          )
          const committed = new Map<number, bigint>()
          for (const p of groups[0]?.topics.find((t) => t.name === topic)?.partitions ?? []) {
            committed.set(p.partitionIndex, p.committedOffset)
          }
          return partitionIndexes.map((partition) => {
            const offset = committed.get(partition) ?? -1n
            return { partition, offset: offset < 0n ? null : offset }
          })
        })
    }

    const producer = (options: KafkaClient.ProducerOptions) =>
      Effect.gen(function* () {
        const client = yield* Effect.acquireRelease(
          Effect.sync(
            () =>
              new PltProducer({
                ...(base as unknown as ConstructorParameters<typeof PltProducer>[0]),
                idempotent: options.idempotent,
                acks: options.acks,
                compression: options.compression ?? "none",
                autocreateTopics: false,
                // One request at a time per broker keeps per-partition order (forced when idempotent anyway).
                maxInflights: 1,
                // Idempotent: the least the library bounds (≤ 1 means unbounded); our Schedule does the rest.
                retries: options.idempotent ? 2 : 0,
                retryDelay: 100,
                ...(options.ackTimeout !== undefined && { timeout: Duration.toMillis(options.ackTimeout) })
              })
          ),
          (client) => close(() => client.close(true))
        )
        // Probes the brokers once, on the reconnect schedule, so that a producer made while they are away waits.
        yield* Effect.interruptible(
          KafkaClient.retryConnect(
            attempt(brokers, "connect producer", () => client.metadata({ topics: [], retries: 0 })),
            schedule
          )
        )
        // Round robin of keyless records, per topic.
        const nextPartition = new Map<string, number>()
        type Produced = MessageToProduce<Buffer, Buffer, Buffer, Buffer>
        const build = (records: ReadonlyArray<KafkaClient.ProducerRecord>) =>
          Effect.gen(function* () {
            const topics = [...new Set(records.map((record) => record.topic))]
            const metadata = yield* attempt(brokers, "produce", () => client.metadata({ topics }), {
              topic: topics.length === 1 ? topics[0] : undefined
            })
            const messages = new Array<Produced>(records.length)
            for (let index = 0; index < records.length; index++) {
              const record = records[index] as KafkaClient.ProducerRecord
              const count = metadata.topics.get(record.topic)?.partitionsCount ?? 0
              if (count === 0) {
                return yield* new KafkaClient.KafkaError({
                  operation: "produce",
                  topic: record.topic,
                  reason: new KafkaClient.UnknownTopic({ topic: record.topic })
                })
              }
              let partition: number
              if (record.partition !== undefined) {
                if (record.partition < 0 || record.partition >= count) {
                  return yield* new KafkaClient.KafkaError({
                    operation: "produce",
                    topic: record.topic,
                    partition: record.partition,
                    reason: new KafkaClient.BrokerError({
                      type: "UNKNOWN_TOPIC_OR_PARTITION",
                      retriable: false,
                      detail: `${record.topic} has ${count} partitions`
                    })
                  })
                }
                partition = record.partition
              } else if (record.key !== null) {
                partition = partitionForKey(record.key, count)
              } else {
                const next = nextPartition.get(record.topic) ?? 0
                nextPartition.set(record.topic, next + 1)
                partition = next % count
              }
              const message: Produced = { topic: record.topic, partition }
              const keyBytes = toBuffer(record.key)
              if (keyBytes !== undefined) message.key = keyBytes
              const valueBytes = toBuffer(record.value)
              if (valueBytes !== undefined) message.value = valueBytes
              if (record.headers !== undefined) message.headers = toHeaders(record.headers)
              if (record.timestamp !== undefined) message.timestamp = BigInt(record.timestamp)
              messages[index] = message
            }
            return { records, messages, acked: new Array(records.length) } satisfies Built<Produced>
          })
        // Records the offsets of the partitions that answered a send of the records at `places`.
        const recordAnswers = (
          built: Built<Produced>,
          places: ReadonlyArray<number>,
          offsets: ReadonlyArray<{ readonly topic: string; readonly partition: number; readonly offset: bigint }>,
          acks: number
        ) =>
          recordOffsets(
            built,
            places,
            (index) => (built.messages[index] as { partition: number }).partition,
            new Map(offsets.map(({ topic, partition, offset }) => [`${topic} ${partition}`, offset])),
            acks
          )
        // After a failure the same records sent again send only what has not been acked: the library reports the
        // partitions that a failed send wrote (`produced`), and those are not written again. (It takes a fresh
        // producer id after any failed send, so a partition whose answer was lost is written twice.)
        let failed: Built<Produced> | undefined
        const send = (records: ReadonlyArray<KafkaClient.ProducerRecord>) => {
          let built: Built<Produced> | undefined
          return Effect.gen(function* () {
            const resend = failed !== undefined && sameRecords(failed.records, records) ? failed : undefined
            failed = undefined
            built = resend ?? (yield* build(records))
            const current = built
            const places = pendingOf(current)
            const messages = places.map((index) => current.messages[index] as Produced)
            const topics = [...new Set(messages.map((message) => message.topic))]
            const result = yield* attempt(
              brokers,
              "produce",
              () =>
                client.send({ messages }).catch((error: unknown) => {
                  const produced = (error as { produced?: { offsets?: Parameters<typeof recordAnswers>[2] } }).produced
                  // What a failed send wrote; the rest is not acked, whatever the acks (it goes again).
                  recordAnswers(current, places, produced?.offsets ?? [], -1)
                  throw error
                }),
              { topic: topics.length === 1 ? topics[0] : undefined }
            )
            const unanswered = recordAnswers(current, places, result.offsets ?? [], options.acks)
            if (unanswered !== undefined) return yield* notWritten(unanswered)
            return current.acked as Array<KafkaClient.RecordMetadata>
          }).pipe(
            // The library gives these up, and starts the next send on a fresh producer id, which cures both.
            Effect.mapError((error) => (options.idempotent ? retriableOnFreshProducer(error) : error)),
            Effect.tapError(() =>
              Effect.sync(() => {
                failed = built
              })
            )
          )
        }
        return { send } satisfies KafkaClient.ProducerConnection
      })

    const consumer = (options: KafkaClient.ConsumerOptions) => makeConsumer(brokers, base, schedule, options)

    return KafkaClient.KafkaClient.of({ brokers: connection.brokers, admin: adminPort, producer, consumer })
  })

/** Heartbeat and commit answers that mean "the group is rebalancing, or has moved on without this member". */
/** Answers that mean the coordinator moved: look it up again. */
const coordinatorErrors = new Set(["NOT_COORDINATOR", "COORDINATOR_NOT_AVAILABLE", "COORDINATOR_LOAD_IN_PROGRESS"])

/** KIP-848 answers that mean the member must join again from epoch 0, owning nothing. */
const fencedErrors = new Set(["FENCED_MEMBER_EPOCH", "UNKNOWN_MEMBER_ID"])

/** How many times more a batch whose handler died is tried before the member crashes (kafkajs' retries). */
const handlerRetries = 5

// ---------------------------------------------------------------------------------------------------------------
// The consumer
// ---------------------------------------------------------------------------------------------------------------

interface Partition {
  readonly topic: string
  readonly partition: number
}

interface Queued {
  readonly batch: KafkaClient.ConsumerBatch
  /** the lane's epoch when it was fetched: a restart since makes it stale */
  readonly epoch: number
}

/**
 * A partition's fetching and handling. `position` is the next offset to hand to the handler, `fetchAt` the next to
 * fetch: one batch is fetched ahead while the previous is handled. A restart (pause, a handler that stopped early or
 * failed) drops what was fetched ahead, and fetching resumes from `position`; answers to fetches made before it
 * are recognised by `epoch` and ignored.
 */
interface Lane {
  position: bigint
  fetchAt: bigint
  epoch: number
  queue: Array<Queued>
  running: boolean
  inFetch: boolean
}

const newLane = (position: bigint): Lane => ({
  position,
  fetchAt: position,
  epoch: 0,
  queue: [],
  running: false,
  inFetch: false
})

const restart = (lane: Lane) => {
  lane.epoch++
  lane.queue = []
  lane.fetchAt = lane.position
}

const makeConsumer = (
  brokers: string,
  base: Record<string, unknown>,
  schedule: ReturnType<typeof KafkaClient.reconnectSchedule>,
  options: KafkaClient.ConsumerOptions
) =>
  Effect.gen(function* () {
    const firstTopic = options.topics.length === 1 ? options.topics[0] : undefined
    const sessionTimeout = options.sessionTimeout ? Duration.toMillis(options.sessionTimeout) : 30_000
    const heartbeatInterval = options.heartbeatInterval ? Duration.toMillis(options.heartbeatInterval) : 3_000
    const rebalanceTimeout = Math.max(sessionTimeout, 60_000)
    const maxWaitTime = options.fetchMaxWait ? Duration.toMillis(options.fetchMaxWait) : 5_000
    const minBytes = options.fetchMinBytes ?? 1
    const maxBytes = options.fetchMaxBytes ?? 10_485_760
    // Per partition and fetch: with one batch fetched ahead, a member holds up to two of these per partition.
    // Measured draining 1,000,000 events with the consumer program: 512 KiB 232 MB peak in 59 s, 640 KiB 237 MB in
    // 49 s, 768 KiB 247 MB in 43 s, 1 MiB 264 MB in 43 s.
    const partitionMaxBytes = Math.min(maxBytes, 655_360)
    const assignment = yield* SubscriptionRef.make<KafkaClient.Assignment>({ generation: 0, partitions: [] })
    const crashed = yield* Deferred.make<never, KafkaClient.KafkaError>()
    const changed = ChangeSignal.make()
    const consumerScope = yield* Effect.scope
    const incremental = options.groupProtocol === "consumer"

    // The member's state, changed only on the JavaScript thread (library callbacks and our fibers).
    let generation = 0
    let owned = new Map<string, Partition>()
    // one lane per owned partition of the current generation (see Lane)
    let lanes = new Map<string, Lane>()
    const paused = new Set<string>()
    let running = 0
    // running batch calls per partition, for a revocation to wait for
    const runningIn = new Map<string, number>()
    // consecutive failed batch calls per partition
    const handlerFailures = new Map<string, number>()
    let rebalancePending = false
    let stopping = false
    let lastContact = yield* Clock.currentTimeMillis
    const touch = () => {
      lastContact = Math.max(lastContact, Date.now())
    }
    const idleWaiters: Array<() => void> = []
    const notifyIdle = () => {
      if (running > 0) return
      for (const wake of idleWaiters.splice(0)) wake()
    }

    /**
     * Awaited by the library before every JoinGroup: a rebalance waits for running batch calls, which see
     * `isStale` and return, so that work kept inside a handler is committed before the partitions move.
     */
    const protocolsMetadata = () => {
      rebalancePending = true
      changed.notify()
      return new Promise<Buffer>((resolve) => {
        const done = () => {
          clearTimeout(timer)
          resolve(Buffer.alloc(0))
        }
        const timer = setTimeout(done, Math.max(1_000, rebalanceTimeout - 5_000))
        if (running === 0) done()
        else idleWaiters.push(done)
      })
    }

    const client = new PltConsumer({
      ...(base as unknown as ConstructorParameters<typeof PltConsumer>[0]),
      groupId: options.groupId,
      groupProtocol: "classic",
      autocommit: false,
      sessionTimeout,
      heartbeatInterval,
      rebalanceTimeout,
      protocolsMetadata,
      minBytes,
      maxBytes,
      maxWaitTime,
      isolationLevel: FetchIsolationLevels.READ_COMMITTED,
      // the library's rejoin retries; a rejoin that fails for good is a crash, restarted by the Consumer's Schedule
      retries: 5,
      retryDelay: 500
    })
    const fetchPool = new ConnectionPool(options.groupId, {
      connectTimeout: base.connectTimeout as number,
      requestTimeout: Math.max(base.requestTimeout as number, maxWaitTime + 5_000),
      ...(base.tls !== undefined && { tls: base.tls as object, tlsServerName: true }),
      ...(base.sasl !== undefined && { sasl: base.sasl as never })
    } as ConstructorParameters<typeof ConnectionPool>[1])
    client.topics.trackAll(...options.topics)

    const context = yield* Effect.context<never>()
    const runLog = (effect: Effect.Effect<void>) => Effect.runForkWith(context)(effect)
    const crash = (operation: string, cause: unknown) => {
      const reason = reasonOf(cause, brokers)
      runLog(
        Deferred.fail(
          crashed,
          new KafkaClient.KafkaError({ operation, ...(firstTopic !== undefined && { topic: firstTopic }), reason })
        ).pipe(Effect.asVoid)
      )
      changed.notify()
    }
    client.on("error", (error: unknown) => {
      if (!stopping) crash("consume", error)
    })
    client.on("consumer:group:join", (payload: { generationId?: number; assignments?: Array<GroupAssignment> }) => {
      rebalancePending = false
      generation = payload.generationId ?? generation + 1
      const partitions = (payload.assignments ?? []).flatMap(({ topic, partitions: list }) =>
        list.map((partition) => ({ topic, partition }))
      )
      owned = new Map(partitions.map((tp) => [key(tp.topic, tp.partition), tp]))
      lanes = new Map()
      touch()
      runLog(SubscriptionRef.set(assignment, { generation, partitions }))
      changed.notify()
    })
    client.on("consumer:group:rebalance", () => {
      rebalancePending = true
      changed.notify()
    })
    client.on("consumer:heartbeat:end", touch)
    // A heartbeat error that needs a rejoin makes the library rejoin, through the hook above, which marks the
    // rebalance; others (a coordinator that moves) it retries without rejoining: nothing is pending then.

    yield* Effect.acquireRelease(
      Effect.interruptible(
        KafkaClient.retryConnect(
          attempt(brokers, "connect consumer", () => client.metadata({ topics: [...options.topics] }), {
            topic: firstTopic
          }),
          schedule
        )
      ),
      // Leaves the group (one LeaveGroup, so that the others need not wait for the session to time out): 3 s at most.
      () =>
        Effect.suspend(() => {
          stopping = true
          changed.notify()
          heartbeatNow.notify()
          return Effect.andThen(
            incremental
              ? // KIP-848: a heartbeat with epoch -1 leaves the group; then the library's client closes.
                Effect.andThen(
                  close(() => leaveIncremental(), Duration.seconds(3)),
                  close(() => client.close(true))
                )
              : close(() => client.close(true), Duration.seconds(3)),
            // The library leaves its connections open when leaving the group failed; closed here either way.
            Effect.andThen(
              close(() => client.connections.close()),
              close(() => fetchPool.close())
            )
          )
        })
    )

    /** The next offset of each owned partition: the committed one, else the start or end of the log. */
    const loadPositions = Effect.gen(function* () {
      const forLanes = lanes
      // Not for a partition whose batch call from before a rejoin still runs: two calls at once for one partition.
      const partitions = [...owned].filter(([k]) => !lanes.has(k) && (runningIn.get(k) ?? 0) === 0).map(([, tp]) => tp)
      if (partitions.length === 0) return
      const byTopic = new Map<string, Array<number>>()
      for (const { topic, partition } of partitions) byTopic.set(topic, [...(byTopic.get(topic) ?? []), partition])
      const committed = yield* attempt(brokers, "fetch committed offsets", () =>
        client.listCommittedOffsets({ topics: [...byTopic].map(([topic, list]) => ({ topic, partitions: list })) })
      )
      const found = new Map<string, bigint>()
      const missing = new Map<string, Array<number>>()
      for (const { topic, partition } of partitions) {
        const offset = committed.get(topic)?.[partition]
        if (offset !== undefined && offset >= 0n) found.set(key(topic, partition), offset)
        else missing.set(topic, [...(missing.get(topic) ?? []), partition])
      }
      if (missing.size > 0) {
        const listed = yield* attempt(brokers, "fetch topic offsets", () =>
          client.listOffsets({
            topics: [...missing.keys()],
            partitions: Object.fromEntries(missing),
            timestamp: options.fromBeginning ? ListOffsetTimestamps.EARLIEST : ListOffsetTimestamps.LATEST,
            isolationLevel: FetchIsolationLevels.READ_COMMITTED
          })
        )
        for (const [topic, list] of missing) {
          for (const partition of list) found.set(key(topic, partition), listed.get(topic)?.[partition] ?? 0n)
        }
      }
      // Only into the lanes it was loaded for: a classic join since replaced them, and a revocation since drops
      // what it revoked.
      if (lanes !== forLanes) return
      for (const [k, offset] of found) if (owned.has(k) && !lanes.has(k)) lanes.set(k, newLane(offset))
    })

    /** Resets a partition whose position the broker no longer has (deleted by retention) as a fresh one. */
    const resetPositions = (lost: ReadonlyArray<Partition>) =>
      Effect.gen(function* () {
        const byTopic = new Map<string, Array<number>>()
        for (const { topic, partition } of lost) byTopic.set(topic, [...(byTopic.get(topic) ?? []), partition])
        const listed = yield* attempt(brokers, "fetch topic offsets", () =>
          client.listOffsets({
            topics: [...byTopic.keys()],
            partitions: Object.fromEntries(byTopic),
            timestamp: options.fromBeginning ? ListOffsetTimestamps.EARLIEST : ListOffsetTimestamps.LATEST
          })
        )
        for (const { topic, partition } of lost) {
          const offset = listed.get(topic)?.[partition]
          const lane = lanes.get(key(topic, partition))
          if (offset !== undefined && lane !== undefined && lane.queue.length === 0 && !lane.running) {
            lane.position = offset
            restart(lane)
          }
        }
      })

    const commit = (offsets: ReadonlyArray<KafkaClient.TopicPartitionOffset>) =>
      Effect.suspend(() => {
        const member = incremental
          ? memberEpoch > 0
            ? { memberId: ownMemberId, generationId: memberEpoch }
            : undefined
          : client.memberId === null
            ? undefined
            : { memberId: client.memberId, generationId: client.generationId }
        if (stopping || member === undefined) {
          return Effect.fail(
            new KafkaClient.KafkaError({
              operation: "commit",
              reason: new KafkaClient.ClientFailed({
                retriable: false,
                detail: stopping ? "the consumer is stopping" : "the member has not joined its group"
              })
            })
          )
        }
        const byTopic = new Map<
          string,
          Array<{ partitionIndex: number; committedOffset: bigint; committedLeaderEpoch: number }>
        >()
        // Only partitions this member owns now: a batch call that outlived a rejoin (the rebalance wait gave up on
        // it, or the member was fenced) must not move the offset of a partition another member has.
        for (const { topic, partition, offset } of offsets.filter((o) => owned.has(key(o.topic, o.partition)))) {
          const list = byTopic.get(topic) ?? []
          list.push({ partitionIndex: partition, committedOffset: offset, committedLeaderEpoch: -1 })
          byTopic.set(topic, list)
        }
        const topics = [...byTopic].map(([name, partitions]) => ({ name, partitions }))
        if (topics.length === 0) return Effect.void
        return onCoordinator("commit", (connection) =>
          // v9 carries KIP-848's member epoch where v8 carries the classic generation.
          (incremental ? offsetCommitV9 : offsetCommitV8).api.async(
            connection,
            options.groupId,
            member.generationId,
            member.memberId,
            null,
            topics
          )
        ).pipe(Effect.asVoid)
      })

    // The group coordinator, looked up by us: the library caches its own for good unless its own group calls fail,
    // and ours (commits, KIP-848 heartbeats) must find a coordinator that moved.
    let coordinator: { readonly host: string; readonly port: number } | undefined
    const coordinatorConnection = async () => {
      if (coordinator === undefined) {
        const metadata = await client.metadata({ topics: [...options.topics] })
        const any = [...metadata.brokers.values()][Math.floor(Math.random() * metadata.brokers.size)]
        if (any === undefined) throw new Error("no broker in the cluster's metadata")
        const response = await findCoordinatorV4.api.async(await client.connections.get(any), 0, [options.groupId])
        const found = response.coordinators[0]
        if (found === undefined) throw new Error(`no coordinator for group ${options.groupId}`)
        coordinator = { host: found.host, port: found.port }
      }
      return client.connections.get(coordinator)
    }
    /** One request to the coordinator; an answer that says it moved (or no answer) makes the next look it up. */
    const onCoordinator = <A>(operation: string, request: (connection: Connection) => Promise<A>) =>
      attempt(brokers, operation, async () => request(await coordinatorConnection())).pipe(
        Effect.tap(() => Effect.sync(touch)),
        Effect.tapError((error) =>
          Effect.sync(() => {
            const reason = error.reason
            if (
              reason._tag === "ConnectionFailed" ||
              reason._tag === "RequestTimedOut" ||
              (reason._tag === "BrokerError" && coordinatorErrors.has(reason.type))
            ) {
              coordinator = undefined
            }
          })
        )
      )

    // While a rejoin waits for batch calls the library does not heartbeat: the calls do, at most once an interval.
    let lastOwnHeartbeat = 0
    const heartbeat = Effect.suspend(() => {
      if (!rebalancePending || client.memberId === null) return Effect.void
      const now = Date.now()
      if (now - lastOwnHeartbeat < heartbeatInterval) return Effect.void
      lastOwnHeartbeat = now
      const memberId = client.memberId
      return onCoordinator("heartbeat", (connection) =>
        heartbeatV4.api.async(connection, options.groupId, client.generationId, memberId, null)
      ).pipe(Effect.asVoid)
    })

    // -------------------------------------------------------------------------------------------------------------
    // KIP-848 (groupProtocol "consumer"): the member heartbeats itself with its owned partitions; the broker answers
    // with the member epoch and, when it changes, the target assignment. Partitions it takes away are given up once
    // their batch calls returned (the next heartbeat says so); the others go on untouched: no stop-the-world.
    // -------------------------------------------------------------------------------------------------------------
    const ownMemberId = randomUUID()
    let memberEpoch = 0
    // revoked partitions whose batch calls have not returned yet: still reported as owned
    const revoking = new Map<string, Partition>()
    const heartbeatNow = ChangeSignal.make()
    let brokerHeartbeatInterval = heartbeatInterval

    const leaveIncremental = async () => {
      if (memberEpoch <= 0) return
      const connection = await coordinatorConnection()
      await consumerGroupHeartbeatV1.api.async(
        connection,
        options.groupId,
        ownMemberId,
        -1,
        null,
        null,
        rebalanceTimeout,
        null,
        null,
        null,
        null
      )
    }

    /**
     * The assignment the Consumer sees is what the member holds: its target and the revoked partitions it has not
     * given up yet. A revoked partition's running batch call commits what it finished before the partition goes
     * (the broker gives it to another member only once this one reported it released): left out, that progress
     * would be handled again by the next owner.
     */
    const publishHeld = () =>
      runLog(SubscriptionRef.set(assignment, { generation, partitions: [...owned.values(), ...revoking.values()] }))

    const setOwned = (partitions: ReadonlyArray<Partition>) => {
      const next = new Map(partitions.map((tp) => [key(tp.topic, tp.partition), tp]))
      for (const k of [...lanes.keys()]) if (!next.has(k)) lanes.delete(k)
      owned = next
      generation = memberEpoch
      publishHeld()
      changed.notify()
    }

    /** Revoked partitions without a running batch call are given up; the next heartbeat, sent now, says so. */
    const settleRevocations = () => {
      let settled = false
      for (const k of [...revoking.keys()]) {
        if ((runningIn.get(k) ?? 0) === 0) {
          revoking.delete(k)
          settled = true
        }
      }
      if (settled) {
        publishHeld()
        heartbeatNow.notify()
      }
    }

    /** One KIP-848 heartbeat, and what its answer changes. */
    const heartbeatIncremental = Effect.gen(function* () {
      const metadata = yield* attempt(brokers, "heartbeat", () => client.metadata({ topics: [...options.topics] }))
      const idOf = new Map<string, string>()
      const nameOf = new Map<string, string>()
      for (const [name, topic] of metadata.topics) {
        idOf.set(name, topic.id)
        nameOf.set(topic.id, name)
      }
      const reported = new Map<string, Array<number>>()
      for (const { topic, partition } of [...owned.values(), ...revoking.values()]) {
        const id = idOf.get(topic)
        if (id !== undefined) reported.set(id, [...(reported.get(id) ?? []), partition])
      }
      const sentEpoch = memberEpoch
      const response = yield* onCoordinator("heartbeat", (connection) =>
        consumerGroupHeartbeatV1.api.async(
          connection,
          options.groupId,
          ownMemberId,
          sentEpoch,
          null,
          null,
          rebalanceTimeout,
          [...options.topics],
          null,
          null,
          [...reported].map(([topicId, partitions]) => ({ topicId, partitions }))
        )
      ).pipe(
        Effect.tapError((error) =>
          Effect.sync(() => {
            // Fenced (its session expired, or the group moved on): it owns nothing and joins again from epoch 0.
            if (error.reason._tag === "BrokerError" && fencedErrors.has(error.reason.type)) {
              memberEpoch = 0
              revoking.clear()
              setOwned([])
            }
          })
        )
      )
      memberEpoch = response.memberEpoch
      if (response.heartbeatIntervalMs > 0) brokerHeartbeatInterval = response.heartbeatIntervalMs
      const target = response.assignment?.topicPartitions
      if (target === undefined || target === null) return
      const partitions = target.flatMap(({ topicId, partitions: list }) => {
        const topic = nameOf.get(topicId)
        return topic === undefined ? [] : list.map((partition) => ({ topic, partition }))
      })
      const targetKeys = new Set(partitions.map((tp) => key(tp.topic, tp.partition)))
      // Assigned back before its revocation settled: it is this member's again (a new lane waits for the old call).
      for (const k of targetKeys) revoking.delete(k)
      for (const [k, tp] of owned) {
        // Revoked: its lane goes (queued batches are dropped, a running one is stale); given up once it returns.
        if (!targetKeys.has(k)) revoking.set(k, tp)
      }
      setOwned(partitions)
      settleRevocations()
    })

    /** The KIP-848 member: heartbeats at the broker's interval, at once when a revocation settled. */
    const membership = Effect.gen(function* () {
      let failures = 0
      while (!stopping) {
        const ticket = heartbeatNow.ticket()
        const beat = yield* Effect.exit(heartbeatIncremental)
        if (Exit.isSuccess(beat)) {
          failures = 0
        } else {
          const error = Cause.squash(beat.cause) as KafkaClient.KafkaError
          failures++
          const fenced = error.reason?._tag === "BrokerError" && fencedErrors.has(error.reason.type)
          if (!fenced && (error.retriable !== true || failures > 30)) {
            yield* Deferred.fail(crashed, new KafkaClient.KafkaError({ operation: "consume", reason: error.reason }))
            return
          }
          if (fenced) continue
        }
        yield* Effect.raceFirst(Effect.sleep(Duration.millis(brokerHeartbeatInterval)), ticket)
      }
    })

    const run = <R>(handle: KafkaClient.BatchHandler<R>) =>
      Effect.gen(function* () {
        const callerContext = yield* Effect.context<R>()
        const permits = yield* Semaphore.make(options.partitionsConsumedConcurrently ?? 1)
        if (incremental) {
          // Joins with epoch 0; the partitions come in this or later heartbeats' answers.
          yield* heartbeatIncremental.pipe(Effect.retry({ schedule, while: (error) => error.retriable }))
          yield* Effect.forkIn(membership, consumerScope)
        } else {
          yield* attempt(brokers, "join group", () => client.joinGroup({})).pipe(
            Effect.retry({ schedule, while: (error) => error.retriable })
          )
        }

        /**
         * A lane is fetched for while its batch runs (one batch ahead), not while one waits, a fetch is out, it is
         * paused or no longer this member's, nor from an offset its running batch covers.
         */
        const fetchable = (k: string, lane: Lane) =>
          lanes.get(k) === lane &&
          !paused.has(k) &&
          !lane.inFetch &&
          lane.queue.length === 0 &&
          !(lane.running && lane.fetchAt <= lane.position)

        /** Handles one batch; true when the lane may go on to its next queued batch. */
        const callHandler = (lane: Lane, batch: KafkaClient.ConsumerBatch) =>
          Effect.gen(function* () {
            const k = key(batch.topic, batch.partition)
            // Fetched before a rejoin, paused since, or a rebalance pending: not handled; fetched again later (or
            // by the partition's new owner) from the same position.
            // (A lane is replaced at every classic join, and dropped when its partition is revoked.)
            if (lanes.get(k) !== lane || paused.has(k) || rebalancePending || stopping) {
              return false
            }
            running++
            runningIn.set(k, (runningIn.get(k) ?? 0) + 1)
            const exit = yield* handle(batch, {
              heartbeat,
              isStale: Effect.sync(() => rebalancePending || lanes.get(k) !== lane),
              isRunning: Effect.sync(() => !stopping)
            }).pipe(
              Effect.provideContext(callerContext),
              Effect.exit,
              Effect.ensuring(
                Effect.sync(() => {
                  running--
                  runningIn.set(k, (runningIn.get(k) ?? 1) - 1)
                  notifyIdle()
                  // The last call from before a rejoin returned: its partition's new lane may be made now.
                  if ((runningIn.get(k) ?? 0) === 0 && owned.has(k) && !lanes.has(k)) changed.notify()
                  if (revoking.size > 0) settleRevocations()
                })
              )
            )
            if (Exit.isFailure(exit)) {
              // A handler that died: its batch is fetched again and tried 5 times more, a little later each time,
              // then the member crashes (as kafkajs does), for the Consumer's Schedule to restart it.
              const failed = (handlerFailures.get(k) ?? 0) + 1
              handlerFailures.set(k, failed)
              if (failed > handlerRetries) {
                handlerFailures.delete(k)
                crash("consume", Cause.squash(exit.cause))
              } else {
                yield* Effect.sleep(Duration.millis(Math.min(2_000, 100 * 2 ** (failed - 1))))
              }
              return false
            }
            handlerFailures.delete(k)
            if (lanes.get(k) !== lane) return false
            const next = (batch.records[batch.records.length - 1]?.offset ?? -1n) + 1n
            lane.position = exit.value === undefined ? next : exit.value.resumeAt
            // Stopped early: what was fetched after this batch is dropped, and fetched again from `resumeAt`.
            return lane.position === next
          }).pipe(permits.withPermits(1))

        /** Runs a lane's queued batches one after the other, in offset order: one such fiber per lane at a time. */
        /** Ends the lane's drain: one synchronous step, so no batch can be queued between the check and the end. */
        const finish = (lane: Lane) => {
          lane.running = false
          // After a restart while a batch ran, fetching resumes from where that batch left the lane.
          if (lane.queue.length === 0 && !lane.inFetch) lane.fetchAt = lane.position
          changed.notify()
        }
        /** The lane's next batch, or its end (no batch waits): decided and done in one synchronous step. */
        const takeOrFinish = (lane: Lane) =>
          Effect.sync(() => {
            const item = lane.queue.shift()
            if (item === undefined) finish(lane)
            return item
          })
        const drain = (lane: Lane): Effect.Effect<void> =>
          Effect.gen(function* () {
            while (true) {
              const item = yield* takeOrFinish(lane)
              if (item === undefined) return
              // A batch that starts before the lane's position (fetched again after a restart while it ran) is
              // trimmed to what was not handled yet.
              const batch =
                item.batch.records[0] !== undefined && item.batch.records[0].offset < lane.position
                  ? { ...item.batch, records: item.batch.records.filter((r) => r.offset >= lane.position) }
                  : item.batch
              const goOn =
                item.epoch === lane.epoch && (batch.records.length === 0 || (yield* callHandler(lane, batch)))
              if (!goOn) restart(lane)
            }
          }).pipe(Effect.onInterrupt(() => Effect.sync(() => finish(lane))))

        const fetchFrom = (
          node: number,
          wanted: ReadonlyArray<readonly [Partition, Lane]>,
          topicIds: ReadonlyMap<string, string>
        ) =>
          Effect.gen(function* () {
            const byTopic = new Map<string, FetchRequestTopic>()
            const asked = new Map<string, bigint>()
            const askedLanes = new Map<string, { readonly lane: Lane; readonly epoch: number }>()
            for (const [{ topic, partition }, lane] of wanted) {
              const topicId = topicIds.get(topic)
              // Checked again now: a pause, resume or restart since the round chose it may have moved `fetchAt` back
              // under a running batch.
              if (topicId === undefined || !fetchable(key(topic, partition), lane)) continue
              const k = key(topic, partition)
              asked.set(k, lane.fetchAt)
              askedLanes.set(k, { lane, epoch: lane.epoch })
              lane.inFetch = true
              const entry = byTopic.get(topicId) ?? { topicId, partitions: [] }
              entry.partitions.push({
                partition,
                fetchOffset: lane.fetchAt,
                partitionMaxBytes,
                currentLeaderEpoch: -1,
                lastFetchedEpoch: -1
              })
              byTopic.set(topicId, entry)
            }
            if (byTopic.size === 0) return
            const namesById = new Map([...topicIds].map(([name, id]) => [id, name]))
            const response = yield* Effect.tryPromise({
              try: () =>
                client.fetch({
                  node,
                  topics: [...byTopic.values()],
                  minBytes,
                  maxBytes,
                  maxWaitTime,
                  connectionPool: fetchPool
                }),
              catch: (cause) => cause
            }).pipe(
              // One partition in error fails the whole fetch; the answer for the others is still in it.
              Effect.catch((cause) => {
                const partial = (cause as { response?: FetchResponse }).response
                if (partial !== undefined && Array.isArray(partial.responses)) return Effect.succeed(partial)
                return Effect.fail(
                  new KafkaClient.KafkaError({ operation: "fetch", ...located(reasonOf(cause, brokers), asked) })
                )
              }),
              Effect.ensuring(
                Effect.sync(() => {
                  for (const { lane } of askedLanes.values()) lane.inFetch = false
                })
              )
            )
            touch()
            let retriablePartitionErrors = 0
            const outOfRange: Array<Partition> = []
            for (const topicResponse of response.responses) {
              const topic = namesById.get(topicResponse.topicId) ?? topicResponse.topicId
              for (const p of topicResponse.partitions) {
                const k = key(topic, p.partitionIndex)
                const from = asked.get(k)
                const at = askedLanes.get(k)
                // Restarted since it was asked for (paused, stopped early, a failed call): its answer is stale.
                if (from === undefined || at === undefined || at.epoch !== at.lane.epoch || lanes.get(k) !== at.lane) {
                  continue
                }
                const lane = at.lane
                if (p.errorCode === 1) {
                  outOfRange.push({ topic, partition: p.partitionIndex })
                  continue
                }
                if (p.errorCode !== 0) {
                  const error = new ProtocolError(p.errorCode)
                  if (error.canRetry === false) {
                    // Refused for good (authorization, say): the member stops, saying so, rather than ask again.
                    return yield* new KafkaClient.KafkaError({
                      operation: "fetch",
                      topic,
                      partition: p.partitionIndex,
                      reason: new KafkaClient.BrokerError({
                        type: String(error.apiId),
                        retriable: false,
                        detail: error.message
                      })
                    })
                  }
                  // A leader that moved, a partition not there yet: fresh metadata, and the next round asks again.
                  client.clearMetadata()
                  retriablePartitionErrors++
                  continue
                }
                if (paused.has(k)) continue
                const batches = p.records ?? []
                const records = toRecords(topic, p.partitionIndex, batches, from, p.abortedTransactions)
                if (records.length === 0) {
                  // Control or compacted-away records only: step over them.
                  const end = endOf(batches)
                  if (end !== undefined && end > from) {
                    lane.fetchAt = end
                    if (lane.queue.length === 0 && !lane.running) lane.position = end
                  }
                  continue
                }
                lane.fetchAt = (records[records.length - 1]?.offset ?? from) + 1n
                lane.queue.push({
                  batch: { topic, partition: p.partitionIndex, records, highWatermark: p.highWatermark },
                  epoch: lane.epoch
                })
                if (!lane.running) {
                  lane.running = true
                  yield* Effect.forkDetach(drain(lane))
                }
              }
            }
            if (outOfRange.length > 0) yield* resetPositions(outOfRange)
            // Answers that are all retriable refusals: a pause before asking again, not a busy loop.
            if (retriablePartitionErrors > 0 && retriablePartitionErrors === askedLanes.size) {
              yield* Effect.sleep("200 millis")
            }
          })

        // The fetch loop: each round asks every leader, in parallel, for the partitions that are neither paused
        // nor in a batch call, then waits for a change when there is nothing to ask for.
        let failures = 0
        const round = Effect.gen(function* () {
          const ticket = changed.ticket()
          if (stopping) return
          if (rebalancePending) return yield* ticket
          if ([...owned.keys()].some((k) => !lanes.has(k) && (runningIn.get(k) ?? 0) === 0)) {
            yield* loadPositions
            return
          }
          const wanted: Array<readonly [Partition, Lane]> = []
          for (const [k, tp] of owned) {
            const lane = lanes.get(k)
            if (lane !== undefined && fetchable(k, lane)) wanted.push([tp, lane])
          }
          if (wanted.length === 0) return yield* ticket
          const metadata = yield* attempt(brokers, "fetch", () => client.metadata({ topics: [...options.topics] }))
          const topicIds = new Map<string, string>()
          const byLeader = new Map<number, Array<readonly [Partition, Lane]>>()
          for (const entry of wanted) {
            const [tp] = entry
            const topicMetadata = metadata.topics.get(tp.topic)
            if (topicMetadata === undefined) continue
            topicIds.set(tp.topic, topicMetadata.id)
            const leader = topicMetadata.partitions[tp.partition]?.leader ?? -1
            if (leader < 0) continue
            byLeader.set(leader, [...(byLeader.get(leader) ?? []), entry])
          }
          if (byLeader.size === 0) return yield* Effect.sleep("200 millis")
          yield* Effect.forEach([...byLeader], ([node, list]) => fetchFrom(node, list, topicIds), {
            concurrency: "unbounded",
            discard: true
          })
          failures = 0
        }).pipe(
          Effect.catch((error: KafkaClient.KafkaError) => {
            failures++
            if (!error.retriable || failures > 20) {
              return Deferred.fail(
                crashed,
                new KafkaClient.KafkaError({
                  operation: "consume",
                  ...(error.topic !== undefined && { topic: error.topic }),
                  ...(error.partition !== undefined && { partition: error.partition }),
                  reason: error.reason
                })
              ).pipe(Effect.andThen(Effect.interrupt))
            }
            return Effect.logDebug(`fetch failed (attempt ${failures}): ${error.message}`).pipe(
              Effect.andThen(Effect.sleep(Duration.millis(Math.min(5_000, 100 * 2 ** failures))))
            )
          })
        )
        // In the consumer's scope: it stops when the member does.
        yield* Effect.forkIn(
          Effect.whileLoop({ while: () => !stopping, body: () => round, step: () => undefined }),
          consumerScope
        )
      })

    const byKeys = (partitions: ReadonlyArray<KafkaClient.TopicPartition>) =>
      partitions.map(({ topic, partition }) => key(topic, partition))
    return {
      run,
      commit,
      pause: (partitions) =>
        Effect.sync(() => {
          for (const k of byKeys(partitions)) {
            paused.add(k)
            // What was fetched ahead is dropped; a running batch finishes.
            const lane = lanes.get(k)
            if (lane !== undefined) restart(lane)
          }
        }),
      resume: (partitions) =>
        Effect.sync(() => {
          for (const k of byKeys(partitions)) paused.delete(k)
          changed.notify()
        }),
      assignment: SubscriptionRef.get(assignment),
      assignments: SubscriptionRef.changes(assignment),
      crashed: Deferred.await(crashed),
      lastContact: Effect.sync(() => lastContact)
    } satisfies KafkaClient.ConsumerConnection
  })

/**
 * @platformatic/kafka against real brokers. Connecting waits for the brokers on `KafkaClient.reconnectSchedule`.
 *
 * @example
 * ```ts
 * import * as Platformatic from "kafka-effect/engines/platformatic"
 * const Client = Platformatic.layer(connection)   // or KafkaClient.layerConfig with KAFKA_CLIENT=platformatic
 * ```
 */
export const layer = (
  connection: KafkaConfig.ConnectionConfig
): Layer.Layer<KafkaClient.KafkaClient, KafkaClient.KafkaError> =>
  Layer.effect(KafkaClient.KafkaClient, make(connection))

/** `layer` configured from the environment (`KafkaConfig.connection`). */
export const layerConfig: Layer.Layer<KafkaClient.KafkaClient, KafkaClient.KafkaError | KafkaConfig.KafkaConfigError> =
  Layer.unwrap(Effect.map(KafkaConfig.connection, layer))
