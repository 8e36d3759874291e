/**
 * What the engine adapters share: turning a client library's failed promise into a `KafkaError`, reading TLS files,
 * and the errors an idempotent producer recovers from on a fresh producer id. No engine is imported here.
 */
import * as Fs from "node:fs"
import { Effect } from "effect"
import * as KafkaClient from "../KafkaClient.ts"

/** A thrown value as the error-like object an engine's classifier reads (a non-object becomes its message). */
export const asErrorLike = <E extends { readonly message?: string }>(cause: unknown): E =>
  typeof cause === "object" && cause !== null ? (cause as E) : ({ message: String(cause) } as E)

/** Node's codes for a failed TLS handshake: retrying cannot fix a certificate. */
export const isTlsCode = (code: unknown) =>
  typeof code === "string" && /CERT|SELF_SIGNED|ERR_TLS|ERR_SSL|UNABLE_TO_(GET|VERIFY)|HOSTNAME/.test(code)

/**
 * `attempt(brokers, operation, run, where)`: runs a library call, its failure classified by the engine's `reasonOf`.
 * A library that reports a missing topic only as UNKNOWN_TOPIC_OR_PARTITION, without the name, gets it from `where`.
 */
export const makeAttempt =
  (reasonOf: (cause: unknown, brokers: string) => KafkaClient.KafkaErrorReason) =>
  <A>(
    brokers: string,
    operation: string,
    run: () => Promise<A>,
    where?: { readonly topic?: string | undefined; readonly partition?: number | undefined }
  ): Effect.Effect<A, KafkaClient.KafkaError> =>
    Effect.tryPromise({
      try: run,
      catch: (cause) => {
        let reason = reasonOf(cause, brokers)
        if (
          where?.topic !== undefined &&
          reason._tag === "BrokerError" &&
          reason.type === "UNKNOWN_TOPIC_OR_PARTITION"
        ) {
          reason = new KafkaClient.UnknownTopic({ topic: where.topic })
        }
        return new KafkaClient.KafkaError({ operation, ...where, reason })
      }
    })

/** A PEM file named by a TLS variable, read at start-up; a file that cannot be read is a TLS failure naming it. */
export const readPem = (variable: string, path: string) =>
  Effect.try({
    try: () => Fs.readFileSync(path, "utf8"),
    catch: (cause) =>
      new KafkaClient.KafkaError({
        operation: "read TLS files",
        reason: new KafkaClient.TlsFailed({ detail: `${variable}=${path} cannot be read: ${String(cause)}` })
      })
  })

/** Topics just created whose partitions the broker cannot answer for yet: retriable. */
export const leaderless = (detail: string) =>
  new KafkaClient.KafkaError({
    operation: "create topics",
    reason: new KafkaClient.BrokerError({ type: "LEADER_NOT_AVAILABLE", retriable: true, detail })
  })

/** Errors about an idempotent producer's id or sequence, which a fresh producer does not have. */
const producerStateErrors = new Set([
  "UNKNOWN_PRODUCER_ID",
  "OUT_OF_ORDER_SEQUENCE_NUMBER",
  "INVALID_PRODUCER_EPOCH",
  "INVALID_PRODUCER_ID_MAPPING"
])

/** A produce error about the producer's id or sequence (`UNKNOWN_PRODUCER_ID`, `OUT_OF_ORDER_SEQUENCE_NUMBER`, …). */
export const isProducerStateError = (error: KafkaClient.KafkaError): boolean =>
  error.reason._tag === "BrokerError" && producerStateErrors.has(error.reason.type)

/**
 * A produce error about the producer's id or sequence made retriable: the next try of an idempotent producer goes
 * out on a fresh producer id (both engines see to it), which has neither problem.
 */
export const retriableOnFreshProducer = (error: KafkaClient.KafkaError): KafkaClient.KafkaError =>
  error.reason._tag === "BrokerError" && !error.reason.retriable && isProducerStateError(error)
    ? new KafkaClient.KafkaError({
        operation: error.operation,
        ...(error.topic !== undefined && { topic: error.topic }),
        ...(error.partition !== undefined && { partition: error.partition }),
        reason: new KafkaClient.BrokerError({ type: error.reason.type, retriable: true, detail: error.reason.detail })
      })
    : error

/**
 * A send's records, the engine's messages for them and what has been acked of them. Kept after a failure: the same
 * records sent again reuse the messages (so the same partitions and, where the engine keeps its producer id, the
 * same sequence numbers) and send only what has not been acked.
 */
export interface Built<M> {
  readonly records: ReadonlyArray<KafkaClient.ProducerRecord>
  readonly messages: ReadonlyArray<M>
  /** each record's metadata, once its partition's share has been answered */
  readonly acked: Array<KafkaClient.RecordMetadata | undefined>
}

/** The same records, in the same order (the Producer retries a batch with the very same record objects). */
export const sameRecords = (
  a: ReadonlyArray<KafkaClient.ProducerRecord>,
  b: ReadonlyArray<KafkaClient.ProducerRecord>
): boolean => {
  if (a === b) return true
  if (a.length !== b.length) return false
  for (let index = 0; index < a.length; index++) if (a[index] !== b[index]) return false
  return true
}

/** The places in `built` of the records not acked yet. */
export const pendingOf = (built: Built<unknown>): Array<number> => {
  const places: Array<number> = []
  for (let index = 0; index < built.records.length; index++) if (built.acked[index] === undefined) places.push(index)
  return places
}

/**
 * Records in `built.acked` the offset of each record at `places` (in the order they were sent) whose partition
 * answered: the base offset of its partition's share (`baseOffsets`, by `${topic} ${partition}`) plus its place
 * in that share. With acks=0 nobody answers and every record gets -1. Returns the first record's topic-partition
 * that has no answer, if any.
 */
export const recordOffsets = <M>(
  built: Built<M>,
  places: ReadonlyArray<number>,
  partitionOf: (index: number) => number,
  baseOffsets: Map<string, bigint>,
  acks: number
): KafkaClient.TopicPartition | undefined => {
  let unanswered: KafkaClient.TopicPartition | undefined
  for (const index of places) {
    const topic = (built.records[index] as KafkaClient.ProducerRecord).topic
    const partition = partitionOf(index)
    const key = `${topic} ${partition}`
    const offset = baseOffsets.get(key)
    if (offset !== undefined && offset >= 0n) {
      baseOffsets.set(key, offset + 1n)
      built.acked[index] = { topic, partition, offset }
    } else if (acks === 0) {
      built.acked[index] = { topic, partition, offset: -1n }
    } else if (unanswered === undefined) {
      unanswered = { topic, partition }
    }
  }
  return unanswered
}

/** A partition the client did not answer for: its records were not written (retriable). */
export const notWritten = ({ topic, partition }: KafkaClient.TopicPartition) =>
  new KafkaClient.KafkaError({
    operation: "produce",
    topic,
    partition,
    reason: new KafkaClient.ClientFailed({
      retriable: true,
      detail: "no response for this partition: not written (its leader may have moved during the request)"
    })
  })
