/**
 * The KafkaClient contract: one set of behaviours, run against `InMemoryKafka.layer` and against
 * the kafkajs engine (`KafkaJS.layer`) on a real broker, so the fake cannot drift from Kafka where tests rely on it.
 *
 * Where the fake cannot match the broker exactly — when a rebalance happens, how long it takes — a test states the
 * weaker property both must meet ("eventually the members' assignments split the partitions"), with a bound on how
 * long the real broker may take.
 */
import { assert, describe, it } from "@effect/vitest"
import { Deferred, Duration, Effect, Exit, type Layer, Option, type Scope, Stream } from "effect"
import { partitionForKey } from "../../src/internal/murmur2.ts"
import * as KafkaClient from "../../src/KafkaClient.ts"
import { uniqueName } from "../support/kafka.ts"

const text = (bytes: Uint8Array | null) => (bytes === null ? null : new TextDecoder().decode(bytes))

/** How long the real broker may take for a group to form or rebalance; the in-memory one takes no time. */
const groupTimeout = Duration.seconds(45)

const withinGroupTimeout = <A, E, R>(what: string, effect: Effect.Effect<A, E, R>) =>
  effect.pipe(
    Effect.timeoutOrElse({
      duration: groupTimeout,
      orElse: () => Effect.die(new Error(`timed out waiting for ${what}`))
    })
  )

/** Settings that make a real group react in well under a second; the in-memory broker ignores them. */
const consumerOptions = (groupId: string, topics: ReadonlyArray<string>, fromBeginning = true) =>
  ({
    groupId,
    topics,
    fromBeginning,
    sessionTimeout: Duration.seconds(10),
    heartbeatInterval: Duration.millis(300),
    fetchMaxWait: Duration.millis(100),
    partitionsConsumedConcurrently: 4
  }) satisfies KafkaClient.ConsumerOptions

const createTopic = (partitions: number, prefix = "contract") =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const topic = uniqueName(prefix)
    yield* client.admin.createTopics([{ topic, partitions }])
    return topic
  })

const send = (records: ReadonlyArray<KafkaClient.ProducerRecord>) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const producer = yield* client.producer({ idempotent: true, acks: -1 })
    return yield* producer.send(records)
  }).pipe(Effect.scoped)

/** A group member that keeps every record it handles; `received(n)` waits until it has at least n. */
const collector = (
  options: KafkaClient.ConsumerOptions,
  onBatch?: (batch: KafkaClient.ConsumerBatch) => Effect.Effect<void>
) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const consumer = yield* client.consumer(options)
    const seen: Array<KafkaClient.ConsumedRecord> = []
    let waiters: Array<{ readonly count: number; readonly done: Deferred.Deferred<void> }> = []
    yield* consumer.run((batch) =>
      Effect.gen(function* () {
        seen.push(...batch.records)
        if (onBatch) yield* onBatch(batch)
        // Update the list before waking anyone: a woken waiter may register the next one at once.
        const ready = waiters.filter((waiter) => seen.length >= waiter.count)
        waiters = waiters.filter((waiter) => seen.length < waiter.count)
        for (const waiter of ready) Deferred.doneUnsafe(waiter.done, Effect.void)
      })
    )
    const received = (count: number) =>
      Effect.gen(function* () {
        if (seen.length >= count) return seen
        // Made and registered in one step: no batch can slip between the check above and the registration.
        const done = Deferred.makeUnsafe<void>()
        waiters.push({ count, done })
        yield* withinGroupTimeout(`${count} records (have ${seen.length})`, Deferred.await(done))
        return seen
      })
    return { consumer, seen, received }
  })

/** Waits until the member's assignment satisfies `predicate`. */
const assignmentWhere = (
  consumer: KafkaClient.ConsumerConnection,
  what: string,
  predicate: (assignment: KafkaClient.Assignment) => boolean
) =>
  withinGroupTimeout(
    what,
    consumer.assignments.pipe(Stream.filter(predicate), Stream.runHead, Effect.map(Option.getOrThrow))
  )

const partitionsOf = (assignment: KafkaClient.Assignment) => assignment.partitions.map((tp) => tp.partition).sort()

/** What an implementation does that the port leaves to it, and the tests state by name. */
export interface Behaviour {
  /**
   * `background`: the member heartbeats whatever its batch handlers do (the in-memory broker has no sessions at
   * all); `betweenBatches`: only between batch calls, so a handler that runs longer than the session timeout must
   * call `session.heartbeat` (kafkajs).
   */
  readonly heartbeats: "background" | "betweenBatches"
  /** a real broker's session is measured in seconds; the in-memory broker's test need not wait */
  readonly realBroker: boolean
  /** the group protocol the members use (classic when absent) */
  readonly groupProtocol?: "classic" | "consumer" | undefined
}

export const contractSuite = (
  name: string,
  layer: () => Layer.Layer<KafkaClient.KafkaClient, unknown>,
  behaviour: Behaviour = { heartbeats: "background", realBroker: true }
) =>
  describe(`KafkaClient contract: ${name}`, () => {
    /** The suite's member settings, in the group protocol under test. */
    const memberOptions = (groupId: string, topics: ReadonlyArray<string>, fromBeginning = true) => ({
      ...consumerOptions(groupId, topics, fromBeginning),
      ...(behaviour.groupProtocol !== undefined && { groupProtocol: behaviour.groupProtocol })
    })

    const test = (title: string, body: Effect.Effect<void, unknown, KafkaClient.KafkaClient | Scope.Scope>) =>
      it.live(title, () => body.pipe(Effect.scoped, Effect.provide(layer())), 120_000)

    test(
      "records of a partition are delivered in offset order, each once",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        yield* send(Array.from({ length: 100 }, (_, i) => ({ topic, key: null, value: `v${i}` })))
        const { received } = yield* collector(memberOptions(uniqueName("order"), [topic]))
        const records = yield* received(100)
        assert.deepStrictEqual(
          records.map((r) => r.offset),
          Array.from({ length: 100 }, (_, i) => BigInt(i))
        )
        assert.deepStrictEqual(
          records.map((r) => text(r.value)),
          Array.from({ length: 100 }, (_, i) => `v${i}`)
        )
      })
    )

    test(
      "a handler that stops early gets the rest of its batch again, not skipped",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        yield* send(Array.from({ length: 10 }, (_, i) => ({ topic, key: null, value: `v${i}` })))
        const client = yield* KafkaClient.KafkaClient
        const consumer = yield* client.consumer(memberOptions(uniqueName("resume-at"), [topic]))
        const seen: Array<bigint> = []
        const done = yield* Deferred.make<void>()
        let stopped = false
        yield* consumer.run((batch) =>
          Effect.sync(() => {
            const first = batch.records[0]?.offset ?? 0n
            if (!stopped && batch.records.length > 1) {
              // Take one record, leave the rest.
              stopped = true
              seen.push(first)
              return { resumeAt: first + 1n }
            }
            seen.push(...batch.records.map((r) => r.offset))
            if (seen.length >= 10) Deferred.doneUnsafe(done, Effect.void)
          })
        )
        yield* withinGroupTimeout("the rest of the batch", Deferred.await(done))
        assert.deepStrictEqual(
          seen.slice(0, 10),
          Array.from({ length: 10 }, (_, i) => BigInt(i))
        )
      })
    )

    test(
      "a key lands on murmur2's partition for it, and send reports where each record landed",
      Effect.gen(function* () {
        const topic = yield* createTopic(6)
        const records = Array.from({ length: 200 }, (_, i) => ({ topic, key: `key-${i % 37}`, value: `v${i}` }))
        const metadata = yield* send(records)
        metadata.forEach((m, i) => {
          assert.strictEqual(m.partition, partitionForKey(`key-${i % 37}`, 6), `record ${i}`)
        })
        const { received } = yield* collector(memberOptions(uniqueName("keys"), [topic]))
        const consumed = yield* received(200)
        for (const record of consumed) {
          const index = Number(text(record.value)?.slice(1))
          assert.strictEqual(record.partition, metadata[index]?.partition)
          assert.strictEqual(record.offset, metadata[index]?.offset)
          assert.strictEqual(text(record.key), `key-${index % 37}`)
        }
      })
    )

    test(
      "headers, null keys and null values round-trip",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        const binary = new Uint8Array([0, 1, 2, 253, 254, 255])
        yield* send([
          {
            topic,
            key: "k",
            value: "with headers",
            headers: { "x-text": "é ✓", "x-binary": binary, "x-empty": "", "x-twice": ["first", "second"] }
          },
          { topic, key: null, value: "null key" },
          { topic, key: "tombstone", value: null }
        ])
        const { received } = yield* collector(memberOptions(uniqueName("headers"), [topic]))
        const [first, second, third] = yield* received(3)
        assert.strictEqual(text(first?.headers["x-text"] ?? null), "é ✓")
        assert.deepStrictEqual([...(first?.headers["x-binary"] ?? [])], [...binary])
        assert.strictEqual(first?.headers["x-empty"]?.length, 0)
        // A name that occurs twice: the last value in `headers`, both in order in `repeatedHeaders`.
        assert.strictEqual(text(first?.headers["x-twice"] ?? null), "second")
        assert.deepStrictEqual(
          (first?.repeatedHeaders?.["x-twice"] ?? []).map((value) => text(value)),
          ["first", "second"]
        )
        assert.deepStrictEqual(Object.keys(first?.repeatedHeaders ?? {}), ["x-twice"])
        assert.isUndefined(second?.repeatedHeaders)
        assert.isNull(second?.key ?? null)
        assert.strictEqual(text(second?.value ?? null), "null key")
        // Node Buffers on both, as kafkajs hands them out: String() of a value is its text, not its bytes' numbers.
        assert.strictEqual(String(second?.value), "null key")
        assert.strictEqual(String(first?.headers["x-text"]), "é ✓")
        assert.strictEqual(text(third?.key ?? null), "tombstone")
        assert.isNull(third?.value)
        assert.isAbove(first?.timestamp ?? 0, 0)
      })
    )

    test(
      "a restarted member resumes from the group's committed offset",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        const groupId = uniqueName("resume")
        yield* send(Array.from({ length: 10 }, (_, i) => ({ topic, key: null, value: `v${i}` })))
        yield* Effect.scoped(
          Effect.gen(function* () {
            const { consumer, received } = yield* collector(memberOptions(groupId, [topic]))
            yield* received(10)
            yield* consumer.commit([{ topic, partition: 0, offset: 6n }])
          })
        )
        const client = yield* KafkaClient.KafkaClient
        const committed = yield* client.admin.fetchCommittedOffsets(groupId, topic)
        assert.deepStrictEqual(committed, [{ partition: 0, offset: 6n }])
        const { received } = yield* collector(memberOptions(groupId, [topic]))
        const records = yield* received(4)
        assert.deepStrictEqual(
          records.map((r) => r.offset),
          [6n, 7n, 8n, 9n]
        )
      })
    )

    test(
      "two members split the partitions, and the one that stays takes them all when the other leaves",
      Effect.gen(function* () {
        const topic = yield* createTopic(4)
        const groupId = uniqueName("split")
        const a = yield* collector(memberOptions(groupId, [topic]))
        yield* assignmentWhere(a.consumer, "a to own all 4 partitions", (x) => x.partitions.length === 4)
        yield* Effect.scoped(
          Effect.gen(function* () {
            const b = yield* collector(memberOptions(groupId, [topic]))
            // Weaker than Kafka's timing, which both meet: eventually the two assignments split the partitions.
            const ofB = yield* assignmentWhere(b.consumer, "b to get partitions", (x) => x.partitions.length > 0)
            const ofA = yield* assignmentWhere(
              a.consumer,
              "a to give up b's partitions",
              (x) => x.generation >= ofB.generation && x.partitions.length === 4 - ofB.partitions.length
            )
            assert.deepStrictEqual([...partitionsOf(ofA), ...partitionsOf(ofB)].sort(), [0, 1, 2, 3])
            if (behaviour.groupProtocol === "consumer") {
              // KIP-848: the broker's uniform assignor balances the members.
              assert.deepStrictEqual([ofA.partitions.length, ofB.partitions.length], [2, 2])
            } else {
              // Round-robin, kafkajs' default: dealt one each, so each member has every other partition.
              assert.sameDeepMembers(
                [partitionsOf(ofA), partitionsOf(ofB)],
                [
                  [0, 2],
                  [1, 3]
                ]
              )
            }
          })
        )
        yield* assignmentWhere(a.consumer, "a to take all 4 back", (x) => x.partitions.length === 4)
        yield* send([0, 1, 2, 3].map((partition) => ({ topic, key: null, value: `after-${partition}`, partition })))
        const records = yield* a.received(4)
        assert.includeMembers(
          records.map((r) => text(r.value)),
          ["after-0", "after-1", "after-2", "after-3"]
        )
      })
    )

    if (behaviour.groupProtocol !== "consumer") {
      test(
        "a running batch call learns of a rebalance from a refused heartbeat, and is stale from then on",
        Effect.gen(function* () {
          const topic = yield* createTopic(2)
          const groupId = uniqueName("stale")
          yield* send([{ topic, key: null, value: "x", partition: 0 }])
          const client = yield* KafkaClient.KafkaClient
          const a = yield* client.consumer(memberOptions(groupId, [topic]))
          const inCall = yield* Deferred.make<boolean>()
          const refusal = yield* Deferred.make<{ readonly reason: string; readonly stale: boolean }>()
          let calls = 0
          yield* a.run((_batch, session) =>
            Effect.gen(function* () {
              // Only the first call waits for the rebalance; after it the batch may come back to this member.
              if (++calls > 1) return
              yield* Deferred.succeed(inCall, yield* session.isStale)
              // Heartbeat as a long batch call must, until the group refuses one.
              while (true) {
                const exit = yield* Effect.exit(session.heartbeat)
                if (Exit.isFailure(exit)) {
                  const reason = Option.match(Exit.findErrorOption(exit), {
                    onNone: () => "none",
                    onSome: (error) => (error.reason._tag === "BrokerError" ? error.reason.type : error.reason._tag)
                  })
                  yield* Deferred.succeed(refusal, { reason, stale: yield* session.isStale })
                  return
                }
                yield* Effect.sleep("100 millis")
              }
            })
          )
          assert.isFalse(yield* withinGroupTimeout("the batch call", Deferred.await(inCall)), "not stale at first")
          // A second member joins: the group rebalances, and waits for a's call.
          yield* collector(memberOptions(groupId, [topic]))
          const refused = yield* withinGroupTimeout("a refused heartbeat", Deferred.await(refusal))
          assert.deepStrictEqual(refused, { reason: "REBALANCE_IN_PROGRESS", stale: true })
        })
      )
    } else {
      test(
        "KIP-848: a running batch call is stale once its partition is revoked, while the member's other partition goes on (no stop-the-world); the member holds the revoked partition (its assignment, for commits) until the call returns",
        Effect.gen(function* () {
          const topic = yield* createTopic(2)
          const groupId = uniqueName("incremental")
          yield* send([0, 1].map((partition) => ({ topic, key: null, value: "x", partition })))
          const client = yield* KafkaClient.KafkaClient
          const a = yield* client.consumer(memberOptions(groupId, [topic]))
          const started = yield* Deferred.make<void>()
          const staleIn = yield* Deferred.make<number>()
          const release = yield* Deferred.make<void>()
          const running = new Set<number>()
          const first = new Set<number>()
          // What a held while its revoked call was still running: the Consumer commits that call's progress to the
          // partitions of the assignment, and the next owner starts from it.
          let heldWhileStale: ReadonlyArray<number> = []
          yield* a.run((batch, session) =>
            Effect.gen(function* () {
              // The first call of each partition stays until it is stale (or released at the end).
              if (first.has(batch.partition)) return
              first.add(batch.partition)
              running.add(batch.partition)
              if (running.size === 2) yield* Deferred.succeed(started, undefined)
              while (!(yield* Deferred.isDone(release))) {
                if (yield* session.isStale) {
                  heldWhileStale = partitionsOf(yield* a.assignment)
                  running.delete(batch.partition)
                  yield* Deferred.succeed(staleIn, batch.partition)
                  return
                }
                yield* Effect.sleep("50 millis")
              }
              running.delete(batch.partition)
            })
          )
          yield* withinGroupTimeout("both partitions' calls", Deferred.await(started))
          const b = yield* collector(memberOptions(groupId, [topic]))
          const revoked = yield* withinGroupTimeout("a revoked call", Deferred.await(staleIn))
          const ofB = yield* assignmentWhere(
            b.consumer,
            "b to get the revoked partition",
            (x) => x.partitions.length === 1
          )
          assert.deepStrictEqual(partitionsOf(ofB), [revoked])
          assert.deepStrictEqual(heldWhileStale, [0, 1], "a still held the revoked partition while its call ran")
          const ofA = yield* assignmentWhere(a, "a to give it up", (x) => x.partitions.length === 1)
          assert.deepStrictEqual(partitionsOf(ofA), [1 - revoked])
          // The partition a kept: its call was never stale, and runs still.
          assert.deepStrictEqual([...running], [1 - revoked])
          yield* Deferred.succeed(release, undefined)
        })
      )
    }

    test(
      "a batch handler that keeps failing is tried a few times, then the consumer crashes",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        yield* send([{ topic, key: null, value: "poison" }])
        const client = yield* KafkaClient.KafkaClient
        const consumer = yield* client.consumer(memberOptions(uniqueName("crash"), [topic]))
        let calls = 0
        yield* consumer.run(() =>
          Effect.suspend(() => {
            calls++
            return Effect.die(new Error("a handler bug"))
          })
        )
        const error = yield* withinGroupTimeout("the crash", Effect.flip(consumer.crashed))
        assert.strictEqual(error.operation, "consume")
        // kafkajs, as the adapter configures it, tries a failed batch call 5 times more; so does the fake.
        assert.strictEqual(calls, 6, "the batch was delivered again before the crash")
      })
    )

    test(
      "a commit before run fails, not retriable",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        const client = yield* KafkaClient.KafkaClient
        const consumer = yield* client.consumer(memberOptions(uniqueName("early"), [topic]))
        const error = yield* Effect.flip(consumer.commit([{ topic, partition: 0, offset: 1n }]))
        assert.strictEqual(error.reason._tag, "ClientFailed")
        assert.isFalse(error.retriable)
      })
    )

    test(
      "a paused partition delivers nothing until it is resumed; the others go on",
      Effect.gen(function* () {
        const topic = yield* createTopic(2)
        const { consumer, seen, received } = yield* collector(memberOptions(uniqueName("pause"), [topic]))
        yield* assignmentWhere(consumer, "both partitions", (x) => x.partitions.length === 2)
        yield* consumer.pause([{ topic, partition: 0 }])
        yield* send([
          { topic, key: null, value: "p0", partition: 0 },
          { topic, key: null, value: "p1", partition: 1 }
        ])
        yield* received(1)
        // The p1 record was produced after p0's: had partition 0 not been paused, p0 could have come too.
        assert.deepStrictEqual(
          seen.map((r) => text(r.value)),
          ["p1"]
        )
        yield* consumer.resume([{ topic, partition: 0 }])
        const records = yield* received(2)
        assert.deepStrictEqual(
          records.map((r) => text(r.value)),
          ["p1", "p0"]
        )
      })
    )

    test(
      "a member starting at the end (fromBeginning false) never sees older records",
      Effect.gen(function* () {
        const topic = yield* createTopic(1)
        yield* send(Array.from({ length: 5 }, (_, i) => ({ topic, key: null, value: `old-${i}` })))
        const { consumer, seen, received } = yield* collector(memberOptions(uniqueName("latest"), [topic], false))
        yield* assignmentWhere(consumer, "the partition", (x) => x.partitions.length === 1)
        // The broker resolves "the end" when the member first fetches; keep producing until a new record arrives.
        yield* withinGroupTimeout(
          "a new record",
          Effect.gen(function* () {
            while (seen.length === 0) {
              yield* send([{ topic, key: null, value: "new" }])
              yield* received(1).pipe(Effect.timeoutOption("200 millis"))
            }
          })
        )
        assert.isTrue(
          seen.every((r) => text(r.value) === "new"),
          "only records produced after the member joined"
        )
      })
    )

    test(
      "unknown topics fail with UnknownTopic, and creating an existing topic creates nothing",
      Effect.gen(function* () {
        const client = yield* KafkaClient.KafkaClient
        const missing = uniqueName("missing")
        const reasonOf = (exit: Exit.Exit<unknown, KafkaClient.KafkaError>) =>
          Exit.isFailure(exit) ? Option.map(Exit.findErrorOption(exit), (e) => e.reason._tag) : Option.none()
        assert.deepStrictEqual(
          reasonOf(yield* Effect.exit(send([{ topic: missing, key: null, value: "x" }]))),
          Option.some("UnknownTopic")
        )
        assert.deepStrictEqual(
          reasonOf(yield* Effect.exit(client.admin.partitionCount(missing))),
          Option.some("UnknownTopic")
        )
        const topic = yield* createTopic(3)
        assert.strictEqual(yield* client.admin.partitionCount(topic), 3)
        assert.deepStrictEqual(yield* client.admin.createTopics([{ topic, partitions: 3 }]), [])
        assert.include(yield* client.admin.listTopics, topic)
        const offsets = yield* client.admin.fetchTopicOffsets(topic)
        assert.deepStrictEqual(
          offsets.map((o) => [o.partition, o.high]),
          [
            [0, 0n],
            [1, 0n],
            [2, 0n]
          ]
        )
      })
    )
    // The broker's lowest allowed session timeout (group.min.session.timeout.ms), and a handler half as long again.
    const session = Duration.seconds(6)
    const stall = behaviour.realBroker ? Duration.seconds(9) : Duration.millis(50)
    /** A member of the shortest session on a topic of one partition holding one record. */
    const slowMember = Effect.gen(function* () {
      const topic = yield* createTopic(1)
      yield* send([{ topic, key: null, value: "slow" }])
      const client = yield* KafkaClient.KafkaClient
      const consumer = yield* client.consumer({
        ...memberOptions(uniqueName("slow"), [topic]),
        sessionTimeout: session,
        heartbeatInterval: Duration.seconds(1)
      })
      return { topic, consumer }
    })
    if (behaviour.heartbeats === "background") {
      test(
        "a batch call longer than the session timeout, with no heartbeat from it, keeps the member its partitions",
        Effect.gen(function* () {
          const { topic, consumer } = yield* slowMember
          const handled = yield* Deferred.make<bigint>()
          yield* consumer.run((batch) =>
            Effect.sleep(stall).pipe(
              Effect.andThen(Deferred.succeed(handled, (batch.records.at(-1)?.offset ?? -1n) + 1n)),
              Effect.asVoid
            )
          )
          const joined = yield* assignmentWhere(consumer, "the partition", (a) => a.partitions.length === 1)
          const next = yield* withinGroupTimeout("the slow batch", Deferred.await(handled))
          // Still the same generation: its commit is accepted, and no rebalance happened.
          yield* consumer.commit([{ topic, partition: 0, offset: next }])
          assert.strictEqual((yield* consumer.assignment).generation, joined.generation)
        })
      )
    } else {
      test(
        "heartbeats only between batches: a batch call longer than the session timeout, with no heartbeat from it, costs the member its generation (handlers call session.heartbeat)",
        Effect.gen(function* () {
          const { topic, consumer } = yield* slowMember
          const committed = yield* Deferred.make<Exit.Exit<void, KafkaClient.KafkaError>>()
          yield* consumer.run((batch) =>
            Effect.sleep(stall).pipe(
              Effect.andThen(
                Effect.exit(
                  consumer.commit([{ topic, partition: 0, offset: (batch.records.at(-1)?.offset ?? -1n) + 1n }])
                )
              ),
              Effect.flatMap((exit) => Deferred.succeed(committed, exit)),
              Effect.asVoid
            )
          )
          const exit = yield* withinGroupTimeout("the slow batch", Deferred.await(committed))
          assert.isTrue(Exit.isFailure(exit), "the group had moved on: the commit is refused")
        })
      )
    }
  })
