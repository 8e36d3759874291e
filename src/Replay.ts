/**
 * Replay: re-publishes dead-lettered records to the topic they first came from.
 *
 * It reads the dead-letter topic from its start up to its end as it was when the replay began (records that
 * arrive later wait for the next replay), with a throwaway consumer group that commits nothing, and sends each
 * record that passes the filters to its original topic: same key, value and original headers, without the
 * history headers of `RetryPolicy`, plus `kafka-effect-replayed-from` (`dlq-topic/partition/offset`). The
 * processor then handles it as a new record (attempt 0). Kafka cannot delete single records, so the dead letters
 * stay where they are: replaying the same range twice sends them twice; narrow a replay with `since`/`until`.
 *
 * Only the dead letters of its own consumer group are replayed (a DLQ shared by several groups holds theirs too),
 * unless `allGroups`; a dead letter without a group header is anyone's, and replayed. A record sent back to its
 * original topic reaches every group that reads that topic, not only the one that dead-lettered it. Dead letters
 * whose original topic no longer exists are counted and left alone, on a dry run too.
 *
 * @example
 * ```ts
 * const summary = yield* Replay.replay({ dlqTopic: "events-dlq", groupId: "billing", errorTags: ["Timeout"], dryRun: true })
 * ```
 */
import { Clock, Deferred, Effect, Exit, Option } from "effect"
import { increment } from "./internal/records.ts"
import * as KafkaClient from "./KafkaClient.ts"
import * as KafkaProducer from "./KafkaProducer.ts"
import * as RetryPolicy from "./RetryPolicy.ts"

/** The header a replayed record carries: where in the dead-letter topic it came from. */
export const replayedFromHeader = "kafka-effect-replayed-from"

export interface ReplayOptions {
  readonly dlqTopic: string
  /**
   * the processor's group id: only its dead letters are replayed (unless `allGroups`); the replay reads with a
   * group of its own named after it
   */
  readonly groupId: string
  /** replay the dead letters of every consumer group, not only `groupId`'s. Default false */
  readonly allGroups?: boolean | undefined
  /** only records whose error tag is one of these */
  readonly errorTags?: ReadonlyArray<string> | undefined
  /** only records first produced to one of these topics */
  readonly originalTopics?: ReadonlyArray<string> | undefined
  /** only records dead-lettered at or after this time (epoch milliseconds) */
  readonly since?: number | undefined
  /** only records dead-lettered before this time (epoch milliseconds) */
  readonly until?: number | undefined
  /** at most this many records */
  readonly max?: number | undefined
  /** count what would be replayed, send nothing */
  readonly dryRun: boolean
}

export interface ReplaySummary {
  /** dead letters read */
  readonly scanned: number
  /** those that passed the filters (and the `max`) */
  readonly matched: number
  /** those sent to their original topic (0 on a dry run) */
  readonly replayed: number
  /** dead letters without readable history headers: their original topic is unknown, so they are left alone */
  readonly unreadable: number
  /** dead letters of other consumer groups, left alone (see `allGroups`) */
  readonly otherGroups: number
  /** matching dead letters whose original topic does not exist (any more), left alone: by that topic */
  readonly topicMissing: Readonly<Record<string, number>>
  /**
   * matching dead letters without a value (dropped as too large, or null from the start), left alone: sent back they
   * would be tombstones (deletes, on a compacted topic) or dead-lettered again. The value of a dropped one is still
   * in its original topic, at the coordinates of its headers.
   */
  readonly withoutValue: number
  /** matched records by original topic */
  readonly byTopic: Readonly<Record<string, number>>
  /** matched records by error tag */
  readonly byErrorTag: Readonly<Record<string, number>>
}

/** Replays the dead letters that pass the filters and succeeds with what it did. */
export const replay = Effect.fn("Replay.replay")(function* (options: ReplayOptions) {
  const client = yield* KafkaClient.KafkaClient
  const producer = yield* KafkaProducer.KafkaProducer
  const summary: {
    -readonly [K in keyof ReplaySummary]: ReplaySummary[K] extends number ? number : Record<string, number>
  } = {
    scanned: 0,
    matched: 0,
    replayed: 0,
    unreadable: 0,
    otherGroups: 0,
    topicMissing: {},
    withoutValue: 0,
    byTopic: {},
    byErrorTag: {}
  }
  // The end of each partition now: the replay stops there.
  const ends = new Map<number, bigint>()
  for (const { partition, low, high } of yield* client.admin.fetchTopicOffsets(options.dlqTopic)) {
    if (high > low) ends.set(partition, high)
  }
  if (ends.size === 0) return summary

  const done = yield* Deferred.make<void, KafkaProducer.ProduceError>()
  const full = () => options.max !== undefined && summary.matched >= options.max
  const matches = (record: KafkaClient.ConsumedRecord, history: RetryPolicy.History) =>
    (options.errorTags === undefined || options.errorTags.includes(history.errorTag)) &&
    (options.originalTopics === undefined || options.originalTopics.includes(history.originalTopic)) &&
    (options.since === undefined || record.timestamp >= options.since) &&
    (options.until === undefined || record.timestamp < options.until)

  const ownGroup = (history: RetryPolicy.History) =>
    options.allGroups === true || RetryPolicy.isOfGroup(history.consumerGroup, options.groupId)

  // Whether each original topic exists, read once per topic: a send to a deleted one would fail the replay.
  const exists = new Map<string, boolean>()
  const topicExists = (topic: string) => {
    const known = exists.get(topic)
    if (known !== undefined) return Effect.succeed(known)
    return client.admin.partitionCount(topic).pipe(
      Effect.map((partitions) => partitions > 0),
      Effect.catchReason("KafkaError", "UnknownTopic", () => Effect.succeed(false)),
      Effect.tap((found) => Effect.sync(() => exists.set(topic, found)))
    )
  }

  const handleBatch: KafkaClient.BatchHandler = (batch) =>
    Effect.gen(function* () {
      const end = ends.get(batch.partition)
      if (end === undefined) return
      const outgoing: Array<KafkaClient.ProducerRecord> = []
      for (const record of batch.records) {
        if (record.offset >= end || full()) break
        summary.scanned++
        const history = RetryPolicy.historyOf(record)
        if (Option.isNone(history)) {
          summary.unreadable++
          continue
        }
        if (!ownGroup(history.value)) {
          summary.otherGroups++
          continue
        }
        if (!matches(record, history.value)) continue
        if (record.value === null || RetryPolicy.headers.valueDropped in record.headers) {
          summary.withoutValue++
          continue
        }
        if (!(yield* topicExists(history.value.originalTopic))) {
          increment(summary.topicMissing, history.value.originalTopic)
          continue
        }
        summary.matched++
        increment(summary.byTopic, history.value.originalTopic)
        increment(summary.byErrorTag, history.value.errorTag)
        outgoing.push({
          topic: history.value.originalTopic,
          key: record.key,
          value: record.value,
          headers: {
            ...RetryPolicy.forwardedHeaders(record),
            [replayedFromHeader]: `${record.topic}/${record.partition}/${record.offset}`
          }
        })
      }
      if (!options.dryRun && outgoing.length > 0) {
        // Each record counts once acked, and all of the batch's sends end before a failure ends the replay, so
        // `replayed` is exactly what was re-published, even when the replay stops partway (it is then logged).
        const exits = yield* Effect.forEach(outgoing, (record) => Effect.exit(producer.send(record)), {
          concurrency: "unbounded"
        })
        summary.replayed += exits.filter(Exit.isSuccess).length
        const failed = exits.find(Exit.isFailure)
        if (failed !== undefined) yield* Deferred.failCause(done, failed.cause)
      }
      const last = batch.records.at(-1)
      if (last !== undefined && last.offset >= end - 1n) ends.delete(batch.partition)
      if (ends.size === 0 || full()) yield* Deferred.succeed(done, undefined)
    }).pipe(
      // Reading a topic's metadata failed (the broker away for longer than the client's retries): the replay ends.
      Effect.catch((error) => Effect.asVoid(Deferred.fail(done, error)))
    )

  const now = Math.floor(yield* Clock.currentTimeMillis)
  yield* Effect.scoped(
    Effect.gen(function* () {
      const connection = yield* client.consumer({
        groupId: `${options.groupId}-replay-${now}`,
        topics: [options.dlqTopic],
        fromBeginning: true
      })
      yield* connection.run(handleBatch)
      yield* Deferred.await(done).pipe(Effect.raceFirst(connection.crashed))
    })
  ).pipe(
    // A replay cannot be undone, and run again it re-publishes what it did before: one that stops before its end
    // (a failed send, a signal) says what it had done, so that the operator can tell what to replay next.
    Effect.onExit((exit) =>
      Exit.isSuccess(exit)
        ? Effect.void
        : Effect.logWarning(`replay stopped before its end; done so far: ${JSON.stringify(summary)}`)
    )
  )
  return summary
})
