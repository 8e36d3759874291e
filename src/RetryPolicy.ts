/**
 * RetryPolicy: the retry-topic ladder and the headers that carry a failed record's history.
 *
 * A record whose handler fails with a retryable error is sent to `${prefix}-1`, then `${prefix}-2`, … up to
 * `${prefix}-${retryMax}`, each topic with its own delay (one fixed delay per topic, so records of a retry
 * partition fall due in offset order), and after the last to the dead-letter topic. A fatal failure goes to the
 * dead-letter topic at once. Retry and dead-letter records keep the original key, value and headers and add the
 * headers below (values are UTF-8 text; times are epoch milliseconds):
 *
 * | header                             | meaning                                                          |
 * | ---------------------------------- | ---------------------------------------------------------------- |
 * | `kafka-effect-original-topic`      | the topic the record was first produced to                      |
 * | `kafka-effect-original-partition`  | its partition there                                              |
 * | `kafka-effect-original-offset`     | its offset there                                                 |
 * | `kafka-effect-original-timestamp`  | its timestamp there                                              |
 * | `kafka-effect-attempt`             | how many times it has failed (1 on the first retry topic)        |
 * | `kafka-effect-first-failure-at`    | when it failed first                                             |
 * | `kafka-effect-due-at`              | when it may be handled again (retry topics only)                 |
 * | `kafka-effect-error-tag`           | the last failure's tag, e.g. `SchemaViolation`, `Timeout`        |
 * | `kafka-effect-error-message`       | the last failure's message (at most 1,000 characters)            |
 * | `kafka-effect-consumer-group`      | the consumer group whose handler failed                          |
 * | `kafka-effect-value-dropped`       | why the value is missing from this dead letter (too large)       |
 *
 * A record too large for its next hop once the headers are added (the broker answers MESSAGE_TOO_LARGE) is
 * dead-lettered without its value (`valueDropped`); its coordinates still lead to it in the original topic.
 *
 * @example
 * ```ts
 * const policy = RetryPolicy.make({ retryTopicPrefix: "events-retry", retryMax: 3, dlqTopic: "events-dlq" })
 * RetryPolicy.retryTopic(policy, 2) // "events-retry-2"
 * RetryPolicy.delay(policy, 2) // 30 seconds with the default delays
 * ```
 */
import { Duration, Option } from "effect"
import type * as KafkaClient from "./KafkaClient.ts"

export const headers = {
  originalTopic: "kafka-effect-original-topic",
  originalPartition: "kafka-effect-original-partition",
  originalOffset: "kafka-effect-original-offset",
  originalTimestamp: "kafka-effect-original-timestamp",
  attempt: "kafka-effect-attempt",
  firstFailureAt: "kafka-effect-first-failure-at",
  dueAt: "kafka-effect-due-at",
  errorTag: "kafka-effect-error-tag",
  errorMessage: "kafka-effect-error-message",
  consumerGroup: "kafka-effect-consumer-group",
  valueDropped: "kafka-effect-value-dropped"
} as const

const ours = new Set<string>(Object.values(headers))

export interface RetryPolicy {
  readonly retryTopicPrefix: string
  /** how many retry topics a retryable failure climbs before the dead-letter topic */
  readonly retryMax: number
  /** the delay of each retry topic, the first for `-1`; the last stands for any further ones */
  readonly delays: ReadonlyArray<Duration.Duration>
  readonly dlqTopic: string
}

/** The default delays: 5 s, 30 s, 3 min, then 3 min for any further retry topic. */
export const defaultDelays: ReadonlyArray<Duration.Duration> = [
  Duration.seconds(5),
  Duration.seconds(30),
  Duration.minutes(3)
]

export const make = (options: {
  readonly retryTopicPrefix: string
  readonly retryMax: number
  readonly dlqTopic: string
  readonly delays?: ReadonlyArray<Duration.Duration> | undefined
}): RetryPolicy => ({
  retryTopicPrefix: options.retryTopicPrefix,
  retryMax: options.retryMax,
  delays: options.delays !== undefined && options.delays.length > 0 ? options.delays : defaultDelays,
  dlqTopic: options.dlqTopic
})

/** The retry topic for the given attempt (1 … retryMax). */
export const retryTopic = (policy: RetryPolicy, attempt: number): string => `${policy.retryTopicPrefix}-${attempt}`

/** The number of a retry topic of this prefix (`prefix-N`, N from 1, on the ladder or beyond it), else undefined. */
export const retryNumberOf = (policy: RetryPolicy, topic: string): number | undefined => {
  const prefix = `${policy.retryTopicPrefix}-`
  if (!topic.startsWith(prefix)) return undefined
  const rest = topic.slice(prefix.length)
  return /^[1-9]\d{0,5}$/.test(rest) ? Number(rest) : undefined
}

/** Every retry topic of the ladder, in order. */
export const retryTopics = (policy: RetryPolicy): ReadonlyArray<string> =>
  Array.from({ length: policy.retryMax }, (_, i) => retryTopic(policy, i + 1))

/** The delay of retry topic `attempt`. */
export const delay = (policy: RetryPolicy, attempt: number): Duration.Duration =>
  policy.delays[Math.min(attempt, policy.delays.length) - 1] ?? Duration.zero

/** What a retry or dead-letter record says about the record it came from. */
export interface History {
  readonly originalTopic: string
  readonly originalPartition: number
  readonly originalOffset: bigint
  readonly originalTimestamp: number
  /** how many times it has failed */
  readonly attempt: number
  readonly firstFailureAt: number
  readonly dueAt: number | undefined
  readonly errorTag: string
  readonly errorMessage: string
  readonly consumerGroup: string
}

const decoder = new TextDecoder()
const text = (record: KafkaClient.ConsumedRecord, name: string): string | undefined => {
  const value = record.headers[name]
  return value === undefined ? undefined : decoder.decode(value)
}
const integer = (value: string | undefined): number | undefined =>
  value !== undefined && /^-?\d+$/.test(value) ? Number(value) : undefined

/**
 * When a retry record may be handled: its due-at header (undefined when absent or unreadable: now). We write whole
 * milliseconds; a fractional one (from an older kafka-effect, under a clock that reads fractions) is rounded up, so
 * that it is never handled early.
 */
export const dueAt = (record: KafkaClient.ConsumedRecord): number | undefined => {
  const value = text(record, headers.dueAt)
  return value !== undefined && /^\d+\.\d+$/.test(value) ? Math.ceil(Number(value)) : integer(value)
}

/**
 * When a record of retry topic `n` (from 1) may be handled: its due-at header, but never later than the record's
 * own timestamp plus that topic's delay, the most any hop to it is given (the hop is produced after its due-at was
 * set, so a genuine one is never cut short). A due-at beyond that — garbled, hostile, or set by a clock far ahead —
 * would keep its partition paused, and every record behind it waiting, for as long.
 */
export const dueAtOn =
  (policy: RetryPolicy, n: number) =>
  (record: KafkaClient.ConsumedRecord): number | undefined => {
    const due = dueAt(record)
    return due === undefined ? undefined : Math.min(due, record.timestamp + Duration.toMillis(delay(policy, n)))
  }

/**
 * Whether a retry or dead-letter record that names `consumerGroup` (`consumerGroupOf`) is `groupId`'s: it is when it
 * names that group, or none (written by an older or foreign tool; leaving it alone would lose it).
 */
export const isOfGroup = (consumerGroup: string, groupId: string): boolean =>
  consumerGroup === "" || consumerGroup === groupId

/** The consumer group whose handler failed a retry or dead-letter record ("" when it names none). */
export const consumerGroupOf = (record: KafkaClient.ConsumedRecord): string => text(record, headers.consumerGroup) ?? ""

/** The history a retry or dead-letter record carries; none for a record that never failed. */
export const historyOf = (record: KafkaClient.ConsumedRecord): Option.Option<History> => {
  const originalTopic = text(record, headers.originalTopic)
  const originalPartition = integer(text(record, headers.originalPartition))
  const originalOffset = text(record, headers.originalOffset)
  const attempt = integer(text(record, headers.attempt))
  if (
    originalTopic === undefined ||
    originalPartition === undefined ||
    originalOffset === undefined ||
    !/^\d+$/.test(originalOffset) ||
    attempt === undefined
  ) {
    return Option.none()
  }
  return Option.some({
    originalTopic,
    originalPartition,
    originalOffset: BigInt(originalOffset),
    originalTimestamp: integer(text(record, headers.originalTimestamp)) ?? record.timestamp,
    attempt,
    firstFailureAt: integer(text(record, headers.firstFailureAt)) ?? record.timestamp,
    dueAt: dueAt(record),
    errorTag: text(record, headers.errorTag) ?? "Unknown",
    errorMessage: text(record, headers.errorMessage) ?? "",
    consumerGroup: consumerGroupOf(record)
  })
}

/** The record's own headers, without the ones this module adds. */
export const originalHeaders = (record: KafkaClient.ConsumedRecord): Record<string, Uint8Array> => {
  const kept: Record<string, Uint8Array> = {}
  for (const [name, value] of Object.entries(record.headers)) if (!ours.has(name)) kept[name] = value
  return kept
}

/** The record's own headers as a next hop carries them: every value of a name that occurs more than once. */
export const forwardedHeaders = (
  record: KafkaClient.ConsumedRecord
): Record<string, Uint8Array | ReadonlyArray<Uint8Array>> => {
  const kept: Record<string, Uint8Array | ReadonlyArray<Uint8Array>> = originalHeaders(record)
  for (const [name, values] of Object.entries(record.repeatedHeaders ?? {})) if (!ours.has(name)) kept[name] = values
  return kept
}

/** A failure to record on the next hop. */
export interface Failure {
  readonly tag: string
  readonly message: string
}

/**
 * The record to produce for `record`'s next hop (a retry topic, or the dead-letter topic when `attempt` passed the
 * last retry topic or the failure is fatal): same key, value and original headers, plus the history headers.
 * `context.history` is the record's history when it comes from a retry topic (`historyOf`), and none when it comes
 * from a main topic: headers of ours that a main-topic record carries (forwarded as it was by some tool) are not
 * its history.
 */
export const nextHop = (
  policy: RetryPolicy,
  record: KafkaClient.ConsumedRecord,
  failure: Failure & { readonly fatal: boolean },
  context: { readonly now: number; readonly consumerGroup: string; readonly history: Option.Option<History> }
): KafkaClient.ProducerRecord => {
  // Kafka's times are whole milliseconds, and so are our headers: a clock can read fractions (TestClock after a
  // jittered delay), which a reader of whole numbers would not accept.
  const now = Math.floor(context.now)
  const previous = context.history
  const attempt = Option.match(previous, { onNone: () => 1, onSome: (history) => history.attempt + 1 })
  const deadLetter = failure.fatal || attempt > policy.retryMax
  const original = Option.getOrElse(previous, () => ({
    originalTopic: record.topic,
    originalPartition: record.partition,
    originalOffset: record.offset,
    originalTimestamp: record.timestamp,
    firstFailureAt: now
  }))
  const added: Record<string, string> = {
    [headers.originalTopic]: original.originalTopic,
    [headers.originalPartition]: String(original.originalPartition),
    [headers.originalOffset]: original.originalOffset.toString(),
    [headers.originalTimestamp]: String(original.originalTimestamp),
    [headers.attempt]: String(attempt),
    [headers.firstFailureAt]: String(original.firstFailureAt),
    [headers.errorTag]: failure.tag,
    [headers.errorMessage]: failure.message.length > 1000 ? `${failure.message.slice(0, 999)}…` : failure.message,
    [headers.consumerGroup]: context.consumerGroup
  }
  if (!deadLetter) added[headers.dueAt] = String(Math.ceil(context.now + Duration.toMillis(delay(policy, attempt))))
  return {
    topic: deadLetter ? policy.dlqTopic : retryTopic(policy, attempt),
    key: record.key,
    value: record.value,
    headers: { ...forwardedHeaders(record), ...added }
  }
}

/** The dead letter to send instead of `hop` when the broker refused it as too large: the same, without its value. */
export const withoutValue = (policy: RetryPolicy, hop: KafkaClient.ProducerRecord): KafkaClient.ProducerRecord => {
  const { [headers.dueAt]: _dueAt, ...kept } = hop.headers ?? {}
  const size = hop.value === null ? 0 : typeof hop.value === "string" ? Buffer.byteLength(hop.value) : hop.value.length
  return {
    ...hop,
    topic: policy.dlqTopic,
    value: null,
    headers: { ...kept, [headers.valueDropped]: `${size} bytes: too large for ${hop.topic} with these headers` }
  }
}
