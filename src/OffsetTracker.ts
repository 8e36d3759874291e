/**
 * OffsetTracker: which offset of a partition may be committed when records finish out of order.
 *
 * Records are `delivered` in offset order and `finished` in any order (a worker pool finishes keys in parallel).
 * The committable offset of a partition is one past the highest offset below which every delivered record has
 * finished — never past an unfinished record, so a crash after the commit loses nothing (at-least-once). Offsets
 * need not be contiguous: compaction and transaction markers leave gaps, and only delivered offsets count.
 *
 * Plain mutable state for the hot path (one call per record); the Consumer owns one per member and uses it from
 * its own fibers.
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

interface PartitionState {
  /** delivered offsets not yet known finished, in offset order, from `head` */
  readonly pending: Array<bigint>
  head: number
  /** finished offsets still behind an unfinished one */
  readonly finishedEarly: Set<bigint>
  /** one past the last offset below which everything finished; undefined before anything was delivered */
  committable: bigint | undefined
  /** the committable offset last handed out by `takeCommit` */
  committed: bigint | undefined
  /** records the committable offset moved past since the last `takeCommits` */
  settled: number
}

export interface OffsetTracker {
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
  /** forgets that these offsets were committed, so the next `takeCommits` offers them again */
  readonly rollback: (commits: ReadonlyArray<Commit>) => void
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

const keyOf = (topic: string, partition: number) => `${topic}\u0000${partition}`

export const make = (): OffsetTracker => {
  const partitions = new Map<
    string,
    { readonly topic: string; readonly partition: number; readonly state: PartitionState }
  >()
  let inFlight = 0

  const stateOf = (topic: string, partition: number) => {
    const key = keyOf(topic, partition)
    let entry = partitions.get(key)
    if (entry === undefined) {
      entry = {
        topic,
        partition,
        state: {
          pending: [],
          head: 0,
          finishedEarly: new Set(),
          committable: undefined,
          committed: undefined,
          settled: 0
        }
      }
      partitions.set(key, entry)
    }
    return entry.state
  }

  const delivered = (topic: string, partition: number, offset: bigint) => {
    const state = stateOf(topic, partition)
    const last = state.pending.length > state.head ? state.pending[state.pending.length - 1] : undefined
    if ((last !== undefined && offset <= last) || (state.committable !== undefined && offset < state.committable)) {
      throw new Error(`offset ${offset} of ${topic}[${partition}] delivered out of order`)
    }
    if (state.pending.length === state.head) {
      // Nothing in flight: everything up to this record is finished.
      state.committable = offset
    }
    state.pending.push(offset)
    inFlight++
  }

  const finished = (topic: string, partition: number, offset: bigint) => {
    const state = stateOf(topic, partition)
    if (state.pending[state.head] !== offset) {
      state.finishedEarly.add(offset)
    } else {
      state.head++
      state.settled++
      state.committable = offset + 1n
      while (state.head < state.pending.length) {
        const next = state.pending[state.head] as bigint
        if (!state.finishedEarly.delete(next)) {
          state.committable = next
          break
        }
        state.head++
        state.settled++
        state.committable = next + 1n
      }
    }
    inFlight--
    // Compact now and then, so the array does not grow for ever.
    if (state.head > 1024 && state.head * 2 > state.pending.length) {
      state.pending.splice(0, state.head)
      state.head = 0
    }
  }

  const takeCommits: OffsetTracker["takeCommits"] = (only) => {
    const out: Array<Commit> = []
    const entries =
      only === undefined ? [...partitions.values()] : only.map((tp) => partitions.get(keyOf(tp.topic, tp.partition)))
    for (const entry of entries) {
      if (entry === undefined) continue
      const { committable, committed } = entry.state
      if (committable !== undefined && committable !== committed) {
        entry.state.committed = committable
        out.push({ topic: entry.topic, partition: entry.partition, offset: committable, records: entry.state.settled })
        entry.state.settled = 0
      }
    }
    return out
  }

  return {
    delivered,
    finished,
    committable: (topic, partition) => partitions.get(keyOf(topic, partition))?.state.committable,
    inFlight: () => inFlight,
    takeCommits,
    rollback: (commits) => {
      for (const { topic, partition, records } of commits) {
        const entry = partitions.get(keyOf(topic, partition))
        if (entry === undefined) continue
        entry.state.committed = undefined
        entry.state.settled += records
      }
    },
    forget: (topic, partition) => {
      const entry = partitions.get(keyOf(topic, partition))
      if (entry === undefined) return 0
      const { pending, head, finishedEarly, settled } = entry.state
      inFlight -= pending.length - head - finishedEarly.size
      partitions.delete(keyOf(topic, partition))
      return pending.length - head + settled
    }
  }
}
