/** Small helpers about consumed records shared by the consumer, the processor and replay. */
import type * as KafkaClient from "../KafkaClient.ts"

const utf8 = new TextDecoder()

/** Where a record is, for log annotations: topic, partition, offset (as text) and key (as UTF-8 text). */
export const coordinates = (record: KafkaClient.ConsumedRecord) => ({
  topic: record.topic,
  partition: record.partition,
  offset: record.offset.toString(),
  key: record.key === null ? null : utf8.decode(record.key)
})

/** Adds one to `counts[key]`. */
export const increment = (counts: Record<string, number>, key: string): void => {
  counts[key] = (counts[key] ?? 0) + 1
}
