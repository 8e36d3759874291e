/**
 * Kafka's default partitioner for keyed records: murmur2 of the key's bytes, made positive, modulo the partition
 * count — the same as the Java client and kafkajs' DefaultPartitioner, so a key lands on the same partition whoever
 * produces it.
 */

/** Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), 32-bit signed. */
export const murmur2 = (data: Uint8Array): number => {
  const length = data.length
  const m = 0x5bd1e995
  const r = 24
  let h = 0x9747b28c ^ length
  const length4 = length >>> 2
  for (let i = 0; i < length4; i++) {
    const i4 = i * 4
    let k = (data[i4] ?? 0) | ((data[i4 + 1] ?? 0) << 8) | ((data[i4 + 2] ?? 0) << 16) | ((data[i4 + 3] ?? 0) << 24)
    k = Math.imul(k, m)
    k ^= k >>> r
    k = Math.imul(k, m)
    h = Math.imul(h, m)
    h ^= k
  }
  const tail = length & ~3
  // murmur2's tail: the last one to three bytes (a switch that falls through, in the Java original).
  const rest = length % 4
  if (rest === 3) h ^= (data[tail + 2] ?? 0) << 16
  if (rest >= 2) h ^= (data[tail + 1] ?? 0) << 8
  if (rest >= 1) {
    h ^= data[tail] ?? 0
    h = Math.imul(h, m)
  }
  h ^= h >>> 13
  h = Math.imul(h, m)
  h ^= h >>> 15
  return h | 0
}

const encoder = new TextEncoder()

/** The partition of a keyed record among `partitions`. */
export const partitionForKey = (key: string | Uint8Array, partitions: number): number =>
  (murmur2(typeof key === "string" ? encoder.encode(key) : key) & 0x7fffffff) % partitions
