/**
 * InMemoryKafka: a Kafka broker in memory behind the `KafkaClient` port, for tests that need no broker.
 *
 * It keeps what tests rely on: topics with partitions; keyed records on the partition Kafka's default partitioner
 * gives (murmur2, as kafkajs and the Java client); offsets, timestamps (from Effect's `Clock`, so `TestClock`
 * controls them), headers, null keys and values; consumer groups with several members, range assignment and
 * rebalances when members join or leave (a rebalance waits for running batch handlers, as with kafkajs); committed
 * offsets; pause/resume; `fromBeginning` or latest; the admin calls; and the broker's errors for unknown topics and
 * for commits from members no longer in their group. Everything is deterministic and runs under `TestClock`:
 * nothing waits on a real timer. Two layers are two brokers.
 *
 * Null-key records go round-robin over partitions from partition 0 (kafkajs starts at a random partition).
 * The same contract suite (test/contract/) runs against this and a real broker.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import * as InMemoryKafka from "kafka-effect/InMemoryKafka"
 *
 * const test = Effect.gen(function* () {
 *   yield* InMemoryKafka.produce("events", [{ key: "k", value: "hello" }])
 *   const records = yield* InMemoryKafka.records("events")
 * }).pipe(Effect.provide(InMemoryKafka.layer({ topics: [{ topic: "events", partitions: 3 }] })))
 * ```
 */
import { Cause, Clock, Context, Deferred, Effect, Layer, Scope, Semaphore, SubscriptionRef } from "effect"
import * as ChangeSignal from "./internal/changeSignal.ts"
import { partitionForKey } from "./internal/murmur2.ts"
import * as KafkaClient from "./KafkaClient.ts"

// ---------------------------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------------------------

interface StoredRecord {
  readonly offset: bigint
  readonly key: Uint8Array | null
  readonly value: Uint8Array | null
  readonly headers: Readonly<Record<string, Uint8Array>>
  readonly repeatedHeaders?: Readonly<Record<string, ReadonlyArray<Uint8Array>>>
  readonly timestamp: number
}

interface Topic {
  readonly name: string
  readonly partitions: Array<Array<StoredRecord>>
  /** round-robin position for null-key records */
  nextNullKeyPartition: number
}

interface Member {
  readonly id: string
  readonly options: KafkaClient.ConsumerOptions
  readonly assignment: SubscriptionRef.SubscriptionRef<KafkaClient.Assignment>
  /** partitions this member may fetch in the current generation */
  partitions: ReadonlyArray<KafkaClient.TopicPartition>
  readonly positions: Map<string, bigint>
  readonly paused: Set<string>
  /** partitions whose handler is running */
  readonly handling: Set<string>
  /** the handler given to `run`, with the services of its caller */
  handler: KafkaClient.BatchHandler | undefined
  running: boolean
  /** batch calls that failed in a row; the member crashes once they outnumber kafkajs' retries */
  failures: number
  /** stops the member as kafkajs does when it gives up: `crashed` fails, the member leaves its group */
  readonly crash: (cause: Cause.Cause<unknown>) => Effect.Effect<void>
}

/** How often kafkajs (as the kafkajs engine configures it) tries a failing batch call again before it crashes. */
const batchRetries = 5

interface Group {
  readonly id: string
  generation: number
  rebalancing: boolean
  readonly members: Map<string, Member>
  readonly committed: Map<string, bigint>
}

const tpKey = (topic: string, partition: number) => `${topic}\u0000${partition}`

// Stored as Node Buffers, as kafkajs hands them out: code that reads a value with `String(value)` or
// `value.toString()` behaves as it will over kafkajs (on a plain Uint8Array it would print the bytes' numbers).
const bytes = (value: string | Uint8Array | null): Uint8Array | null => (value === null ? null : Buffer.from(value))

export interface InMemoryKafkaOptions {
  /** topics that exist from the start */
  readonly topics?: ReadonlyArray<KafkaClient.TopicSpec> | undefined
  /** create a topic on first produce, with `defaultPartitions`, as `auto.create.topics.enable`. Default false */
  readonly autoCreateTopics?: boolean | undefined
  readonly defaultPartitions?: number | undefined
}

/** The broker behind an `InMemoryKafka.layer`, for the test helpers. */
export class InMemoryBroker extends Context.Service<
  InMemoryBroker,
  {
    /** every record of a topic, partition by partition, in offset order */
    readonly records: (
      topic: string
    ) => Effect.Effect<ReadonlyArray<KafkaClient.ConsumedRecord>, KafkaClient.KafkaError>
    /** a group's committed offset of a partition, if any */
    readonly committed: (groupId: string, topic: string, partition: number) => Effect.Effect<bigint | undefined>
    /**
     * A ticket for the next change (a record, a commit, an assignment): take it, check what you wait for, then
     * wait on the ticket, so that no change slips between the check and the wait.
     */
    readonly nextChange: Effect.Effect<Effect.Effect<void>>
  }
>()("kafka-effect/InMemoryBroker") {}

const error = (operation: string, reason: KafkaClient.KafkaErrorReason, topic?: string, partition?: number) =>
  new KafkaClient.KafkaError({
    operation,
    ...(topic !== undefined && { topic }),
    ...(partition !== undefined && { partition }),
    reason
  })

export const make = (options: InMemoryKafkaOptions = {}) =>
  Effect.gen(function* () {
    const topics = new Map<string, Topic>()
    const groups = new Map<string, Group>()
    let memberSeq = 0
    // Any change (a record, a commit, an assignment) notifies; waiters take a ticket before checking.
    const changes = ChangeSignal.make()
    const notify = changes.notify
    const nextChange = changes.ticket

    const createTopic = (spec: KafkaClient.TopicSpec) => {
      topics.set(spec.topic, {
        name: spec.topic,
        partitions: Array.from({ length: spec.partitions }, () => []),
        nextNullKeyPartition: 0
      })
    }
    for (const spec of options.topics ?? []) createTopic(spec)

    const topicOrFail = (operation: string, name: string) =>
      Effect.suspend(() => {
        const topic = topics.get(name)
        if (topic !== undefined) return Effect.succeed(topic)
        if (options.autoCreateTopics === true && operation === "produce") {
          createTopic({ topic: name, partitions: options.defaultPartitions ?? 1 })
          return Effect.succeed(topics.get(name) as Topic)
        }
        return Effect.fail(error(operation, new KafkaClient.UnknownTopic({ topic: name }), name))
      })

    // -------------------------------------------------------------------------------------------------------------
    // Admin
    // -------------------------------------------------------------------------------------------------------------

    const admin: KafkaClient.Admin = {
      createTopics: (specs) =>
        Effect.sync(() => {
          const created: Array<string> = []
          for (const spec of specs) {
            if (topics.has(spec.topic)) continue
            createTopic(spec)
            created.push(spec.topic)
          }
          if (created.length > 0) notify()
          return created
        }),
      deleteTopics: (names) =>
        Effect.gen(function* () {
          for (const name of names) yield* topicOrFail("delete topics", name)
          for (const name of names) topics.delete(name)
          notify()
        }),
      listTopics: Effect.sync(() => [...topics.keys()]),
      partitionCount: (name) => Effect.map(topicOrFail("fetch topic metadata", name), (t) => t.partitions.length),
      fetchTopicOffsets: (name) =>
        Effect.map(topicOrFail("fetch topic offsets", name), (t) =>
          t.partitions.map((records, partition) => ({ partition, low: 0n, high: BigInt(records.length) }))
        ),
      fetchCommittedOffsets: (groupId, name) =>
        Effect.map(topicOrFail("fetch committed offsets", name), (t) =>
          t.partitions.map((_, partition) => ({
            partition,
            offset: groups.get(groupId)?.committed.get(tpKey(name, partition)) ?? null
          }))
        )
    }

    // -------------------------------------------------------------------------------------------------------------
    // Producing
    // -------------------------------------------------------------------------------------------------------------

    const append = (records: ReadonlyArray<KafkaClient.ProducerRecord>) =>
      Effect.gen(function* () {
        // Kafka's timestamps are whole milliseconds; TestClock can read fractions.
        const now = Math.floor(yield* Clock.currentTimeMillis)
        // Check every record first: a request either fails as a whole or is written as a whole.
        const placed: Array<{ topic: Topic; partition: number; record: KafkaClient.ProducerRecord }> = []
        for (const record of records) {
          const topic = yield* topicOrFail("produce", record.topic)
          const count = topic.partitions.length
          let partition: number
          if (record.partition !== undefined) {
            if (record.partition < 0 || record.partition >= count) {
              return yield* error(
                "produce",
                new KafkaClient.BrokerError({
                  type: "UNKNOWN_TOPIC_OR_PARTITION",
                  retriable: true,
                  detail: `partition ${record.partition} of ${record.topic} does not exist (it has ${count})`
                }),
                record.topic,
                record.partition
              )
            }
            partition = record.partition
          } else if (record.key !== null) {
            partition = partitionForKey(record.key, count)
          } else {
            partition = topic.nextNullKeyPartition % count
            topic.nextNullKeyPartition++
          }
          placed.push({ topic, partition, record })
        }
        const metadata = placed.map(({ topic, partition, record }): KafkaClient.RecordMetadata => {
          const log = topic.partitions[partition] as Array<StoredRecord>
          const offset = BigInt(log.length)
          // As Kafka stores them: a name may occur more than once (see ConsumedRecord.repeatedHeaders).
          const headers: Record<string, Uint8Array> = {}
          let repeated: Record<string, ReadonlyArray<Uint8Array>> | undefined
          for (const [name, value] of Object.entries(record.headers ?? {})) {
            const values: ReadonlyArray<KafkaClient.HeaderValue> = Array.isArray(value)
              ? value
              : [value as KafkaClient.HeaderValue]
            const all = values.map((one) => bytes(one) ?? new Uint8Array())
            if (all.length === 0) continue
            headers[name] = all[all.length - 1] as Uint8Array
            if (all.length > 1) {
              repeated ??= {}
              repeated[name] = all
            }
          }
          log.push({
            offset,
            key: bytes(record.key),
            value: bytes(record.value),
            headers,
            ...(repeated !== undefined && { repeatedHeaders: repeated }),
            timestamp: record.timestamp ?? now
          })
          return { topic: topic.name, partition, offset }
        })
        if (metadata.length > 0) notify()
        return metadata
      })

    const producer = (producerOptions: KafkaClient.ProducerOptions) =>
      Effect.succeed<KafkaClient.ProducerConnection>({
        send: (records) =>
          producerOptions.acks === 0
            ? Effect.map(append(records), (metadata) => metadata.map((m) => ({ ...m, offset: -1n })))
            : append(records)
      })

    // -------------------------------------------------------------------------------------------------------------
    // Consumer groups
    // -------------------------------------------------------------------------------------------------------------

    const groupOf = (id: string) => {
      let group = groups.get(id)
      if (group === undefined) {
        group = { id, generation: 0, rebalancing: false, members: new Map(), committed: new Map() }
        groups.set(id, group)
      }
      return group
    }

    /** Waits until no member of the group runs a handler: kafkajs rejoins only after its batches finished. */
    const awaitIdle = (group: Group) =>
      Effect.gen(function* () {
        while (true) {
          const next = nextChange()
          if (![...group.members.values()].some((member) => member.handling.size > 0)) return
          yield* next
        }
      })

    /**
     * Round-robin, as kafkajs' default assigner: the partitions of every topic in turn (topics by name, partitions in
     * order) dealt to the members sorted by id, one each. (kafkajs deals to every member whatever it subscribed to;
     * the fake deals a topic's partitions only to its subscribers.)
     */
    const assign = (group: Group) => {
      const members = [...group.members.values()].filter((m) => m.running).sort((a, b) => a.id.localeCompare(b.id))
      const result = new Map<string, Array<KafkaClient.TopicPartition>>(members.map((m) => [m.id, []]))
      const names = new Set(members.flatMap((m) => m.options.topics))
      let dealt = 0
      for (const name of [...names].sort()) {
        const count = topics.get(name)?.partitions.length ?? 0
        const subscribers = members.filter((m) => m.options.topics.includes(name))
        for (let partition = 0; partition < count; partition++) {
          const member = subscribers[dealt++ % subscribers.length] as Member
          result.get(member.id)?.push({ topic: name, partition })
        }
      }
      return result
    }

    // One rebalance at a time: a second waits for the first to finish, then waits for idle handlers itself.
    const rebalanceLock = yield* Semaphore.make(1)
    const rebalance = (group: Group) =>
      Effect.gen(function* () {
        group.rebalancing = true
        notify()
        yield* awaitIdle(group)
        group.generation++
        const assignment = assign(group)
        for (const member of group.members.values()) {
          const partitions = assignment.get(member.id) ?? []
          member.partitions = partitions
          member.positions.clear()
          // Each partition restarts from the group's committed offset, else from the start or the end.
          for (const { topic, partition } of partitions) {
            const key = tpKey(topic, partition)
            const end = BigInt(topics.get(topic)?.partitions[partition]?.length ?? 0)
            member.positions.set(key, group.committed.get(key) ?? (member.options.fromBeginning ? 0n : end))
          }
          yield* SubscriptionRef.set(member.assignment, { generation: group.generation, partitions })
        }
        group.rebalancing = false
        notify()
      }).pipe(rebalanceLock.withPermits(1))

    /** The next batch of a partition from the member's position, at most `fetchMaxBytes` (at least one record). */
    const batchFor = (member: Member, tp: KafkaClient.TopicPartition): KafkaClient.ConsumerBatch | undefined => {
      const log = topics.get(tp.topic)?.partitions[tp.partition]
      const position = member.positions.get(tpKey(tp.topic, tp.partition)) ?? 0n
      if (log === undefined || position >= BigInt(log.length)) return undefined
      const limit = member.options.fetchMaxBytes ?? 10_485_760
      const records: Array<KafkaClient.ConsumedRecord> = []
      let size = 0
      for (let offset = Number(position); offset < log.length; offset++) {
        const stored = log[offset] as StoredRecord
        size += (stored.key?.length ?? 0) + (stored.value?.length ?? 0)
        if (records.length > 0 && size > limit) break
        records.push({ topic: tp.topic, partition: tp.partition, ...stored })
      }
      return { topic: tp.topic, partition: tp.partition, records, highWatermark: BigInt(log.length) }
    }

    /** Starts handlers for partitions with records, up to the member's concurrency; false when none could start. */
    const dispatch = (group: Group, member: Member, scope: Scope.Scope) =>
      Effect.gen(function* () {
        const handler = member.handler
        if (handler === undefined || group.rebalancing || !member.running) return false
        const concurrency = member.options.partitionsConsumedConcurrently ?? 1
        let started = false
        for (const tp of member.partitions) {
          if (member.handling.size >= concurrency) break
          const key = tpKey(tp.topic, tp.partition)
          if (member.handling.has(key) || member.paused.has(key)) continue
          const batch = batchFor(member, tp)
          if (batch === undefined) continue
          member.handling.add(key)
          started = true
          // As over kafkajs, a batch call learns of a rebalance only from a heartbeat it makes, which the group
          // refuses while it rebalances; from then on the call is stale. (The fake's rebalance waits for running
          // calls, as kafkajs' rejoin does, so no generation passes while one runs.)
          let refused = false
          const session: KafkaClient.BatchSession = {
            heartbeat: Effect.suspend(() => {
              if (!group.rebalancing) return Effect.void
              refused = true
              return Effect.fail(
                error(
                  "heartbeat",
                  new KafkaClient.BrokerError({
                    type: "REBALANCE_IN_PROGRESS",
                    retriable: false,
                    detail: "The group is rebalancing, so a rejoin is needed"
                  })
                )
              )
            }),
            isStale: Effect.sync(() => refused),
            isRunning: Effect.sync(() => member.running)
          }
          yield* handler(batch, session).pipe(
            Effect.tap((result) =>
              Effect.sync(() => {
                member.failures = 0
                const last = batch.records.at(-1)
                const next = result === undefined ? (last?.offset ?? -1n) + 1n : result.resumeAt
                // A rebalance waits for this handler, so the generation it was given is still the current one.
                if (member.positions.has(key)) member.positions.set(key, next)
              })
            ),
            Effect.ensuring(
              Effect.sync(() => {
                member.handling.delete(key)
                notify()
              })
            ),
            // A failing call is tried again (the batch is fetched again from the same position); kafkajs gives up
            // after its retries and crashes the consumer.
            Effect.catchCause((cause) => (++member.failures > batchRetries ? member.crash(cause) : Effect.void)),
            Effect.forkIn(scope)
          )
        }
        return started
      })

    const consumer = (consumerOptions: KafkaClient.ConsumerOptions) =>
      Effect.gen(function* () {
        for (const name of consumerOptions.topics) yield* topicOrFail("subscribe", name)
        const group = groupOf(consumerOptions.groupId)
        const member: Member = {
          id: `member-${++memberSeq}`,
          options: consumerOptions,
          assignment: yield* SubscriptionRef.make<KafkaClient.Assignment>({ generation: 0, partitions: [] }),
          partitions: [],
          positions: new Map(),
          paused: new Set(),
          handling: new Set(),
          handler: undefined,
          running: false,
          failures: 0,
          crash: (cause) =>
            Effect.gen(function* () {
              if (!member.running) return
              yield* Deferred.fail(
                crashed,
                error(
                  "consume",
                  new KafkaClient.ClientFailed({
                    retriable: true,
                    detail: `the batch handler failed ${member.failures} times in a row: ${Cause.pretty(cause)}`
                  }),
                  consumerOptions.topics[0]
                )
              )
              yield* leave
            })
        }
        const scope = yield* Scope.Scope
        const handlers = yield* Scope.fork(scope, "sequential")
        const crashed = yield* Deferred.make<never, KafkaClient.KafkaError>()
        // Leaving: stop fetching, let running handlers finish, leave the group, and rebalance the others.
        const leave = Effect.gen(function* () {
          if (!member.running) return
          member.running = false
          notify()
          while (true) {
            const next = nextChange()
            if (member.handling.size === 0) break
            yield* next
          }
          group.members.delete(member.id)
          member.partitions = []
          if (group.members.size > 0) yield* rebalance(group)
          else notify()
        })

        yield* Effect.addFinalizer(() => leave)

        const fetchLoop = Effect.gen(function* () {
          while (member.running) {
            const next = nextChange()
            const started = yield* dispatch(group, member, handlers)
            if (!started) yield* next
          }
        })

        const run = <R>(handle: KafkaClient.BatchHandler<R>) =>
          Effect.gen(function* () {
            const services = yield* Effect.context<R>()
            member.handler = (batch, session) => Effect.provideContext(handle(batch, session), services)
            member.running = true
            group.members.set(member.id, member)
            yield* rebalance(group)
            yield* Effect.forkIn(fetchLoop, scope)
          })

        const commit = (offsets: ReadonlyArray<KafkaClient.TopicPartitionOffset>) =>
          Effect.gen(function* () {
            // As over kafkajs (and its adapter): no commits before `run`, nor once the member has begun to stop.
            if (!member.running) {
              return yield* error(
                "commit",
                new KafkaClient.ClientFailed({
                  retriable: false,
                  detail:
                    member.handler === undefined
                      ? "the consumer group was not joined: run the consumer first"
                      : "the consumer is stopping"
                }),
                offsets[0]?.topic,
                offsets[0]?.partition
              )
            }
            if (!group.members.has(member.id)) {
              return yield* error(
                "commit",
                new KafkaClient.BrokerError({
                  type: "UNKNOWN_MEMBER_ID",
                  retriable: false,
                  detail: `member ${member.id} is not in group ${group.id}`
                }),
                offsets[0]?.topic,
                offsets[0]?.partition
              )
            }
            for (const { topic, partition } of offsets) {
              const t = yield* topicOrFail("commit", topic)
              if (partition < 0 || partition >= t.partitions.length) {
                return yield* error(
                  "commit",
                  new KafkaClient.BrokerError({
                    type: "UNKNOWN_TOPIC_OR_PARTITION",
                    retriable: true,
                    detail: `partition ${partition} of ${topic} does not exist`
                  }),
                  topic,
                  partition
                )
              }
            }
            for (const { topic, partition, offset } of offsets) group.committed.set(tpKey(topic, partition), offset)
            notify()
          })

        const setPaused = (partitions: ReadonlyArray<KafkaClient.TopicPartition>, paused: boolean) =>
          Effect.sync(() => {
            for (const { topic, partition } of partitions) {
              if (paused) member.paused.add(tpKey(topic, partition))
              else member.paused.delete(tpKey(topic, partition))
            }
            notify()
          })

        return {
          run,
          commit,
          pause: (partitions) => setPaused(partitions, true),
          resume: (partitions) => setPaused(partitions, false),
          assignment: SubscriptionRef.get(member.assignment),
          assignments: SubscriptionRef.changes(member.assignment),
          crashed: Deferred.await(crashed),
          // The in-memory broker always answers.
          lastContact: Clock.currentTimeMillis
        } satisfies KafkaClient.ConsumerConnection
      })

    const client = KafkaClient.KafkaClient.of({ brokers: ["in-memory"], admin, producer, consumer })

    const broker = InMemoryBroker.of({
      records: (name) =>
        Effect.map(topicOrFail("read topic", name), (topic) =>
          topic.partitions.flatMap((log, partition) => log.map((stored) => ({ topic: name, partition, ...stored })))
        ),
      committed: (groupId, topic, partition) =>
        Effect.sync(() => groups.get(groupId)?.committed.get(tpKey(topic, partition))),
      nextChange: Effect.sync(nextChange)
    })
    return { client, broker }
  })

/**
 * An in-memory broker as `KafkaClient`, and `InMemoryBroker` for the test helpers. Each use of the layer is a new,
 * empty broker (but for `options.topics`).
 */
export const layer = (options: InMemoryKafkaOptions = {}): Layer.Layer<KafkaClient.KafkaClient | InMemoryBroker> =>
  Layer.effectContext(
    Effect.map(make(options), ({ client, broker }) =>
      Context.make(KafkaClient.KafkaClient, client).pipe(Context.add(InMemoryBroker, broker))
    )
  )

// ---------------------------------------------------------------------------------------------------------------
// Test helpers
// ---------------------------------------------------------------------------------------------------------------

/** A record for `produce`; the topic is the helper's argument. */
export interface TestRecord {
  readonly key?: string | Uint8Array | null | undefined
  readonly value: string | Uint8Array | null
  readonly headers?: KafkaClient.Headers | undefined
  readonly partition?: number | undefined
}

/** Produces records to a topic through the `KafkaClient` in context (this broker or a real one). */
export const produce = (topic: string, records: ReadonlyArray<TestRecord>) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const connection = yield* client.producer({ idempotent: false, acks: -1 })
    return yield* connection.send(records.map((record) => ({ ...record, topic, key: record.key ?? null })))
  }).pipe(Effect.scoped)

/** Every record of a topic (retry and DLQ topics included), partition by partition, in offset order. */
export const records = (topic: string) =>
  Effect.gen(function* () {
    const broker = yield* InMemoryBroker
    return yield* broker.records(topic)
  })

/** Values of a topic's records as UTF-8 text, partition by partition, in offset order. */
export const values = (topic: string) =>
  Effect.map(records(topic), (list) =>
    list.map((record) => (record.value === null ? null : new TextDecoder().decode(record.value)))
  )

/** Waits until `groupId` has committed `offset` (or beyond) for the partition. Deterministic: no polling. */
export const awaitCommitted = (groupId: string, topic: string, partition: number, offset: bigint) =>
  Effect.gen(function* () {
    const broker = yield* InMemoryBroker
    while (true) {
      const next = yield* broker.nextChange
      const committed = yield* broker.committed(groupId, topic, partition)
      if (committed !== undefined && committed >= offset) return committed
      yield* next
    }
  })
