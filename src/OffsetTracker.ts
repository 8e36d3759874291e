/**
 * OffsetTracker: which offset of a partition may be committed when records finish out of order.
 *
 * Records are `delivered` in offset order and `finished` in any order (a worker pool finishes keys in parallel).
 * The committable offset of a partition is one past the highest offset below which every delivered record has
 * finished — never past an unfinished record, so a crash after the commit loses nothing (at-least-once). Offsets
 * need not be contiguous: compaction and transaction markers leave gaps, and only delivered offsets count.
 *
 * Plain mutable state for the hot path (one call per record); the Consumer owns one per member and uses it from
 * its own fibers. The hot path takes a partition's `PartitionTracker` once per batch and passes sequence numbers:
 * O(1) per record, no allocation. `delivered`/`finished` by offset are the same through a lookup.
 *
 * @example
 * ```ts
 * const tracker = OffsetTracker.make()
 * tracker.delivered("events", 0, 10n); tracker.delivered("events", 0, 11n)
 * tracker.finished("events", 0, 11n)
 * tracker.committable("events", 0) // 10n: 10 is not finished yet
 * tracker.finished("events", 0, 10n)
 * tracker.committable("events", 0) // 12n
 * ```
 */

export interface OffsetTracker {
  /** the tracker of one partition, for the hot path (see `PartitionTracker`); the same until `forget` */
  readonly partition: (topic: string, partition: number) => PartitionTracker
  /** a record was handed to processing; offsets of a partition must be delivered in increasing order */
  readonly delivered: (topic: string, partition: number, offset: bigint) => void
  /** a delivered record finished (handled, or handed to a retry topic or the DLQ and acked) */
  readonly finished: (topic: string, partition: number, offset: bigint) => void
  /** one past the highest offset below which everything delivered has finished */
  readonly committable: (topic: string, partition: number) => bigint | undefined
  /** records delivered and not finished, over all partitions */
  readonly inFlight: () => number
  /**
   * The offsets to commit now: each partition whose committable offset moved since the last call. Marks them
   * committed; call `rollback` for those whose commit failed.
   */
  readonly takeCommits: (
    partitions?: ReadonlyArray<{ readonly topic: string; readonly partition: number }>
  ) => Array<Commit>
  /**
   * forgets that these offsets were committed, so the next `takeCommits` offers them again; returns how many of their
   * records belong to partitions forgotten meanwhile, which nothing will offer again
   */
  readonly rollback: (commits: ReadonlyArray<Commit>) => number
  /**
   * Forgets a partition (it was revoked, or starts afresh): its unfinished records will be delivered again.
   * Returns how many of its delivered records had not been handed out by `takeCommits`.
   */
  readonly forget: (topic: string, partition: number) => number
}

/** An offset to commit, and how many delivered records it commits that no earlier commit did. */
export interface Commit {
  readonly topic: string
  readonly partition: number
  readonly offset: bigint
  readonly records: number
}

/**
 * The records of one partition in flight, as a ring over delivery sequence numbers: a record's sequence number
 * (from `delivered`) indexes its offset and its finished flag, so `finished` is O(1) and the head moves past
 * finished records in O(1) amortised, with no allocation per record (offsets sit in a BigInt64Array).
 */
export interface PartitionTracker {
  readonly topic: string
  readonly partition: number
  /** a record was handed to processing, in increasing offset order; returns its sequence number for `finished` */
  readonly delivered: (offset: bigint) => number
  /** the record with this sequence number finished; a partition forgotten since then ignores it */
  readonly finished: (sequence: number) => void
}

class PartitionState implements PartitionTracker {
  /** `offsets[s & mask]` and `done[s & mask]` belong to the record with sequence number s, for head ≤ s < next */
  private offsets = new BigInt64Array(1024)
  private done = new Uint8Array(1024)
  private mask = 1023
  /** sequence number of the oldest unfinished record (or `next` when none) */
  private head = 0
  /** sequence number of the next record delivered */
  private next = 0
  private lastDelivered: bigint | undefined = undefined
  /** records delivered and not finished */
  unfinished = 0
  /** the committable offset last handed out by `takeCommits` */
  committed: bigint | undefined = undefined
  /** records the committable offset moved past since the last `takeCommits` */
  settled = 0
  forgotten = false

  readonly topic: string
  readonly partition: number
  /** records in flight over all partitions of the tracker */
  private readonly counter: { inFlight: number }

  constructor(topic: string, partition: number, counter: { inFlight: number }) {
    this.topic = topic
    this.partition = partition
    this.counter = counter
  }

  delivered(offset: bigint): number {
    if (this.lastDelivered !== undefined && offset <= this.lastDelivered) {
      throw new Error(`offset ${offset} of ${this.topic}[${this.partition}] delivered out of order`)
    }
    if (this.next - this.head > this.mask) this.grow()
    const sequence = this.next++
    this.offsets[sequence & this.mask] = offset
    this.done[sequence & this.mask] = 0
    this.lastDelivered = offset
    this.unfinished++
    this.counter.inFlight++
    return sequence
  }

  finished(sequence: number): void {
    if (this.forgotten || sequence < this.head || sequence >= this.next) return
    const slot = sequence & this.mask
    if (this.done[slot] === 1) return
    this.done[slot] = 1
    this.unfinished--
    this.counter.inFlight--
    if (sequence !== this.head) return
    let head = this.head + 1
    while (head < this.next && this.done[head & this.mask] === 1) head++
    this.settled += head - this.head
    this.head = head
  }

  /** one past the highest offset below which everything delivered has finished */
  committable(): bigint | undefined {
    if (this.head < this.next) return this.offsets[this.head & this.mask]
    return this.lastDelivered === undefined ? undefined : this.lastDelivered + 1n
  }

  /** The sequence number of an offset in flight: a binary search, as offsets increase with sequence numbers. */
  find(offset: bigint): number | undefined {
    let low = this.head
    let high = this.next - 1
    while (low <= high) {
      const middle = (low + high) >>> 1
      const at = this.offsets[middle & this.mask] as bigint
      if (at === offset) return middle
      if (at < offset) low = middle + 1
      else high = middle - 1
    }
    return undefined
  }

  /** delivered records the committable offset has not moved past */
  pending(): number {
    return this.next - this.head
  }

  private grow() {
    const size = (this.mask + 1) * 2
    const offsets = new BigInt64Array(size)
    const done = new Uint8Array(size)
    for (let s = this.head; s < this.next; s++) {
      offsets[s & (size - 1)] = this.offsets[s & this.mask] as bigint
      done[s & (size - 1)] = this.done[s & this.mask] as number
    }
    this.offsets = offsets
    this.done = done
    this.mask = size - 1
  }
}

const keyOf = (topic: string, partition: number) => `${topic}\u0000${partition}`

export const make = (): OffsetTracker => {
  const partitions = new Map<string, PartitionState>()
  const counter = { inFlight: 0 }

  const partitionOf = (topic: string, partition: number): PartitionState => {
    const key = keyOf(topic, partition)
    let state = partitions.get(key)
    if (state === undefined) {
      state = new PartitionState(topic, partition, counter)
      partitions.set(key, state)
    }
    return state
  }

  const takeCommits: OffsetTracker["takeCommits"] = (only) => {
    const out: Array<Commit> = []
    const states =
      only === undefined ? [...partitions.values()] : only.map((tp) => partitions.get(keyOf(tp.topic, tp.partition)))
    for (const state of states) {
      if (state === undefined) continue
      const committable = state.committable()
      if (committable !== undefined && committable !== state.committed) {
        state.committed = committable
        out.push({ topic: state.topic, partition: state.partition, offset: committable, records: state.settled })
        state.settled = 0
      }
    }
    return out
  }

  return {
    partition: partitionOf,
    delivered: (topic, partition, offset) => void partitionOf(topic, partition).delivered(offset),
    finished: (topic, partition, offset) => {
      const state = partitions.get(keyOf(topic, partition))
      const sequence = state?.find(offset)
      if (state !== undefined && sequence !== undefined) state.finished(sequence)
    },
    committable: (topic, partition) => partitions.get(keyOf(topic, partition))?.committable(),
    inFlight: () => counter.inFlight,
    takeCommits,
    rollback: (commits) => {
      let forgotten = 0
      for (const { topic, partition, records } of commits) {
        const state = partitions.get(keyOf(topic, partition))
        if (state === undefined) {
          forgotten += records
          continue
        }
        state.committed = undefined
        state.settled += records
      }
      return forgotten
    },
    forget: (topic, partition) => {
      const state = partitions.get(keyOf(topic, partition))
      if (state === undefined) return 0
      counter.inFlight -= state.unfinished
      state.forgotten = true
      partitions.delete(keyOf(topic, partition))
      return state.pending() + state.settled
    }
  }
}
