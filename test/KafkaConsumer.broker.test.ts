/**
 * The Consumer against a real broker, with each group member a separate OS process (test/support/consumerProcess.ts)
 * that prints every record it handles and logs its assignments and commits. The test reads those outputs.
 */
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer, Schedule } from "effect"
import { inject } from "vitest"
import * as KafkaClient from "../src/KafkaClient.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { clientLayer, createTopic, uniqueName } from "./support/kafka.ts"
import {
  commitsToLostPartitions,
  handledTwice,
  type Member,
  member,
  orderViolations,
  until
} from "./support/members.ts"

const brokers = inject("kafkaBrokers")

/** Produces `count` records with `keys` distinct keys, values are the record's index. */
const produce = (topic: string, count: number, keys: number) =>
  Effect.gen(function* () {
    const producer = yield* KafkaProducer.KafkaProducer
    yield* producer.sendAll(
      Array.from({ length: count }, (_, i) => ({ topic, key: `key-${i % keys}`, value: String(i) }))
    )
  }).pipe(
    Effect.provide(
      KafkaProducer.layer({ batchSize: 2000, queueCapacity: 100_000 }).pipe(Layer.provide(clientLayer(brokers)))
    )
  )

const committedEverything = (groupId: string, topic: string) =>
  Effect.gen(function* () {
    const client = yield* KafkaClient.KafkaClient
    const high = yield* client.admin.fetchTopicOffsets(topic)
    const committed = yield* client.admin.fetchCommittedOffsets(groupId, topic)
    return high.every((p) => committed.find((c) => c.partition === p.partition)?.offset === p.high)
  }).pipe(
    // A coordinator loading or a leader moving answers with a retriable error for a moment: not yet, not never.
    Effect.catchIf(
      (error) => error.retriable,
      () => Effect.succeed(false)
    ),
    Effect.provide(clientLayer(brokers))
  )

const awaitCommittedEverything = (groupId: string, topic: string) =>
  committedEverything(groupId, topic).pipe(
    Effect.repeat({ until: (done) => done, schedule: Schedule.spaced("250 millis") }),
    Effect.timeoutOrElse({
      duration: "120 seconds",
      orElse: () => Effect.die(new Error(`group ${groupId} did not commit all of ${topic}`))
    })
  )

const memberEnv = (topic: string, groupId: string, extra: Record<string, string> = {}) => ({
  KAFKA_BROKERS: brokers,
  KAFKA_CONSUMER_TOPIC: topic,
  KAFKA_CONSUMER_GROUP_ID: groupId,
  KAFKA_CONSUMER_WORKERS: "8",
  KAFKA_CONSUMER_SESSION_TIMEOUT_MS: "10000",
  KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS: "500",
  KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
  ...extra
})

const unique = (members: ReadonlyArray<Member>) =>
  new Set(members.flatMap((m) => m.processed.map((r) => `${r.partition}/${r.offset}`)))

describe("Consumer: group members as separate processes on a real broker", () => {
  it.live(
    "12 partitions, 50,000 records, 3 members; one leaves and one joins: all processed, order kept, no lost-partition commit",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("members")
        const groupId = uniqueName("members-group")
        yield* createTopic(brokers, topic, 12)
        yield* produce(topic, 50_000, 1000)
        const env = memberEnv(topic, groupId, { HANDLER_DELAY_MS: "5" })
        const a = yield* member("a", env)
        const b = yield* member("b", env)
        const c = yield* member("c", env)
        const all = [a, b, c]
        yield* until("a fifth of the records", () => unique(all).size >= 10_000, all)
        a.signal("SIGTERM")
        const d = yield* member("d", env)
        all.push(d)
        yield* a.exited
        assert.strictEqual(a.exitCode, 0, `a exits 0 on SIGTERM: ${a.stderr.slice(-1000)}`)
        yield* until("every record processed", () => unique(all).size >= 50_000, [b, c, d])
        yield* awaitCommittedEverything(groupId, topic)
        for (const m of [b, c, d]) m.signal("SIGTERM")
        for (const m of [b, c, d]) yield* m.exited

        assert.strictEqual(unique(all).size, 50_000, "every record processed at least once")
        for (const m of all) {
          assert.strictEqual(orderViolations(m), 0, `${m.name}: per-key order within each stretch`)
          assert.strictEqual(commitsToLostPartitions(m), 0, `${m.name}: no commit to a partition it did not own`)
          // Rebalances wait for running batch calls to commit: a member never gets back a record it handled.
          assert.strictEqual(handledTwice(m), 0, `${m.name}: no record handled twice by one member`)
        }
        assert.isAbove(d.processed.length, 0, "the member that joined took work")
      }).pipe(Effect.scoped),
    240_000
  )

  it.live(
    "SIGKILL a member mid-stream and start it again: nothing lost, duplicates at most the in-flight bound",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("killed-member")
        const groupId = uniqueName("killed-group")
        yield* createTopic(brokers, topic, 6)
        yield* produce(topic, 20_000, 500)
        const env = memberEnv(topic, groupId, { HANDLER_DELAY_MS: "1", KAFKA_CONSUMER_MAX_IN_FLIGHT: "500" })
        const first = yield* member("first", env)
        yield* until("some records", () => first.processed.length >= 5_000, [first])
        first.signal("SIGKILL")
        yield* first.exited
        const second = yield* member("second", env)
        yield* awaitCommittedEverything(groupId, topic)
        second.signal("SIGTERM")
        yield* second.exited
        const total = first.processed.length + second.processed.length
        const distinct = unique([first, second]).size
        assert.strictEqual(distinct, 20_000, "nothing lost")
        assert.isAtMost(total - distinct, 500, `duplicates (${total - distinct}) at most the in-flight bound`)
      }).pipe(Effect.scoped),
    240_000
  )

  it.live(
    "SIGTERM then restart: nothing lost and nothing processed twice",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("stopped-member")
        const groupId = uniqueName("stopped-group")
        yield* createTopic(brokers, topic, 6)
        yield* produce(topic, 20_000, 500)
        const env = memberEnv(topic, groupId, { HANDLER_DELAY_MS: "1" })
        const first = yield* member("first", env)
        yield* until("some records", () => first.processed.length >= 5_000, [first])
        first.signal("SIGTERM")
        yield* first.exited
        assert.strictEqual(first.exitCode, 0)
        const second = yield* member("second", env)
        yield* awaitCommittedEverything(groupId, topic)
        second.signal("SIGTERM")
        yield* second.exited
        const total = first.processed.length + second.processed.length
        assert.strictEqual(unique([first, second]).size, 20_000, "nothing lost")
        assert.strictEqual(total, 20_000, "nothing processed twice")
      }).pipe(Effect.scoped),
    240_000
  )
})
