/**
 * The producer adapter against kafkajs' own produce path (`sendMessages` with its retrier), driven by a cluster of
 * two fake brokers: what happens to a request when kafkajs retries it internally. A real single-node broker cannot
 * move a partition's leader, so these cases are built here, on kafkajs' real code.
 */
import { createRequire } from "node:module"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Exit } from "effect"
import { KafkaJSProtocolError, type Message, Partitioners, type RecordMetadata } from "kafkajs"
import {
  type Built,
  byPartition,
  recordAnswers,
  requestOf,
  stablePartitioner
} from "../../src/engines/kafkajs/KafkaJS.ts"
import { notWritten, pendingOf } from "../../src/engines/shared.ts"
import type * as KafkaClient from "../../src/KafkaClient.ts"

interface PartitionData {
  readonly partition: number
  readonly messages: ReadonlyArray<Message>
}
interface ProduceRequest {
  readonly topicData: ReadonlyArray<{ readonly topic: string; readonly partitions: ReadonlyArray<PartitionData> }>
}
type Partitioner = ReturnType<typeof Partitioners.DefaultPartitioner>
type SendMessages = (options: {
  readonly acks: number
  readonly topicMessages: ReadonlyArray<{ readonly topic: string; readonly messages: Array<Message> }>
}) => Promise<Array<RecordMetadata>>

// kafkajs' internals have no type declarations: typed here by what this test uses of them.
const require = createRequire(import.meta.url)
const sendMessages = require("kafkajs/src/producer/sendMessages") as (options: unknown) => SendMessages
const createRetry = require("kafkajs/src/retry") as (options: unknown) => unknown
const { createErrorFromCode } = require("kafkajs/src/protocol/error") as {
  readonly createErrorFromCode: (code: number) => Error
}

const REQUEST_TIMED_OUT = 7
const NOT_LEADER_OR_FOLLOWER = 6

/**
 * Four partitions of topic `t` on brokers 1 and 2 (`leaderOf`, which the test may change), broker 2 failing its
 * first request with `failWith`. Returns kafkajs' send and the log of what each broker stored.
 */
const cluster = (options: {
  readonly failWith: number
  readonly leaderOf: (partition: number) => number
  readonly partitioner: Partitioner
  readonly onFailure?: () => void
}) => {
  const written: Array<string> = []
  let failed = false
  const broker = (nodeId: number) => ({
    nodeId,
    produce: async ({ topicData }: ProduceRequest) => {
      if (nodeId === 2 && !failed) {
        failed = true
        options.onFailure?.()
        throw new KafkaJSProtocolError(createErrorFromCode(options.failWith))
      }
      const partitions = topicData[0]?.partitions ?? []
      for (const { partition, messages } of partitions) {
        for (const message of messages) written.push(`${String(message.value)}@${partition}`)
      }
      return {
        topics: [
          {
            topicName: "t",
            partitions: partitions.map(({ partition }) => ({
              partition,
              errorCode: 0,
              baseOffset: "100",
              logAppendTime: "-1",
              logStartOffset: "0"
            }))
          }
        ]
      }
    }
  })
  const brokers = new Map([1, 2].map((id) => [id, broker(id)]))
  const fakeCluster = {
    refreshMetadataIfNecessary: async () => undefined,
    refreshMetadata: async () => undefined,
    addMultipleTargetTopics: async () => undefined,
    isConnected: () => true,
    findTopicPartitionMetadata: () =>
      [0, 1, 2, 3].map((partitionId) => ({ partitionId, leader: options.leaderOf(partitionId) })),
    findLeaderForPartitions: (_topic: string, partitions: ReadonlyArray<string | number>) => {
      const byLeader: Record<number, Array<number>> = {}
      for (const partition of partitions.map(Number)) {
        const leader = options.leaderOf(partition)
        byLeader[leader] = [...(byLeader[leader] ?? []), partition]
      }
      return byLeader
    },
    // kafkajs passes the node id as an object key, a string.
    findBroker: async ({ nodeId }: { readonly nodeId: number | string }) => brokers.get(Number(nodeId))
  }
  const eosManager = {
    isTransactional: () => false,
    getSequence: () => 0,
    updateSequence: () => undefined,
    acquireBrokerLock: async () => undefined,
    releaseBrokerLock: async () => undefined,
    getProducerId: () => -1,
    getProducerEpoch: () => 0
  }
  const logger = { debug: () => undefined, info: () => undefined, warn: () => undefined, error: () => undefined }
  const send = sendMessages({
    logger,
    cluster: fakeCluster,
    partitioner: options.partitioner,
    eosManager,
    retrier: createRetry({ retries: 1, initialRetryTime: 1, maxRetryTime: 5 })
  })
  return { send, written }
}

const records = (values: ReadonlyArray<string>, key: string | null) =>
  values.map((value): KafkaClient.ProducerRecord => ({ topic: "t", key, value }))
const messagesOf = (produced: ReadonlyArray<KafkaClient.ProducerRecord>) =>
  produced.map(
    (record): Message => ({ key: typeof record.key === "string" ? record.key : null, value: String(record.value) })
  )

/** Each record's metadata from kafkajs' answer to one request of all of `messages`, as the engine reads it. */
const metadataOf = (
  records: ReadonlyArray<KafkaClient.ProducerRecord>,
  messages: ReadonlyArray<Message>,
  assigned: WeakMap<Message, number>,
  responses: ReadonlyArray<RecordMetadata>,
  acks: number
): Effect.Effect<Array<KafkaClient.RecordMetadata>, KafkaClient.KafkaError> => {
  const built: Built = { records, messages, acked: new Array(records.length) }
  const unanswered = recordAnswers(built, Array.from(records.keys()), assigned, responses, acks)
  return unanswered === undefined
    ? Effect.succeed(built.acked as Array<KafkaClient.RecordMetadata>)
    : Effect.fail(notWritten(unanswered))
}

/**
 * Records a–d for partitions 0–3, partition 1 on broker 2, which answers NOT_LEADER_OR_FOLLOWER: its leader is now
 * broker 1. On its retry kafkajs asks only the brokers without a response, so broker 1 is not asked again, and the
 * send resolves without partition 1.
 */
const leaderMovesToAnswered = () => {
  let leaderOfOne = 2
  const assigned = new WeakMap<Message, number>()
  const fake = cluster({
    failWith: NOT_LEADER_OR_FOLLOWER,
    leaderOf: (p) => (p === 1 ? leaderOfOne : p % 2 === 0 ? 1 : 2),
    partitioner: stablePartitioner(assigned)(),
    onFailure: () => {
      leaderOfOne = 1
    }
  })
  const produced = ["a", "b", "c", "d"].map(
    (value, index): KafkaClient.ProducerRecord => ({ topic: "t", key: null, value, partition: index })
  )
  const messages = produced.map((record, index): Message => ({ value: String(record.value), partition: index }))
  return { ...fake, assigned, produced, messages }
}

describe("the producer adapter on kafkajs' produce path", () => {
  it.effect("kafkajs' own partitioner moves null-keyed records on its internal retry, and some are never written", () =>
    Effect.promise(async () => {
      // Why `stablePartitioner` exists: the round robin goes on from where it was on the retry.
      const { send, written } = cluster({
        failWith: REQUEST_TIMED_OUT,
        leaderOf: (p) => (p % 2 === 0 ? 1 : 2),
        partitioner: Partitioners.DefaultPartitioner()
      })
      const values = ["a", "b", "c", "d", "e"]
      await send({ acks: -1, topicMessages: [{ topic: "t", messages: messagesOf(records(values, null)) }] })
      const stored = new Set(written.map((entry) => entry.split("@")[0]))
      assert.isBelow(stored.size, values.length, `kafkajs wrote ${written.join(" ")}`)
    })
  )

  it.effect("with stablePartitioner each null-keyed record is written once, on its first partition", () =>
    Effect.gen(function* () {
      const assigned = new WeakMap<Message, number>()
      const { send, written } = cluster({
        failWith: REQUEST_TIMED_OUT,
        leaderOf: (p) => (p % 2 === 0 ? 1 : 2),
        partitioner: stablePartitioner(assigned)()
      })
      const produced = records(["a", "b", "c", "d", "e"], null)
      const messages = messagesOf(produced)
      const responses = yield* Effect.promise(() => send({ acks: -1, topicMessages: [{ topic: "t", messages }] }))
      assert.deepStrictEqual(
        [...written].sort(),
        messages.map((message) => `${String(message.value)}@${assigned.get(message)}`).sort()
      )
      const metadata = yield* metadataOf(produced, messages, assigned, responses, -1)
      assert.deepStrictEqual(
        metadata.map((m) => m.partition),
        messages.map((message) => assigned.get(message))
      )
    })
  )

  it.effect("a partition whose leader moved to a broker that had answered is not written: a retriable failure", () =>
    Effect.gen(function* () {
      const { send, written, assigned, produced, messages } = leaderMovesToAnswered()
      const responses = yield* Effect.promise(() => send({ acks: -1, topicMessages: [{ topic: "t", messages }] }))
      assert.notInclude(written, "b@1", "kafkajs resolved without writing partition 1")
      const exit = yield* Effect.exit(metadataOf(produced, messages, assigned, responses, -1))
      assert.isTrue(Exit.isFailure(exit))
      if (Exit.isFailure(exit)) {
        const error = exit.cause.reasons.find((reason) => reason._tag === "Fail")
        assert.isTrue(error?._tag === "Fail" && error.error.retriable && error.error.partition === 1, String(error))
      }
    })
  )

  it.effect(
    "sent again after that, only the partition not answered goes out: every record written once, all acked",
    () =>
      Effect.gen(function* () {
        const { send, written, assigned, produced, messages } = leaderMovesToAnswered()
        const built: Built = { records: produced, messages, acked: new Array(produced.length) }
        const first = requestOf(built, pendingOf(built))
        assert.deepStrictEqual(first.places, [0, 1, 2, 3])
        const answers = yield* Effect.promise(() => send({ acks: -1, topicMessages: first.topicMessages }))
        assert.deepStrictEqual(recordAnswers(built, first.places, assigned, answers, -1), { topic: "t", partition: 1 })
        assert.deepStrictEqual(
          built.acked.map((m) => m?.partition),
          [0, undefined, 2, 3]
        )
        const again = byPartition(built, pendingOf(built), assigned)
        assert.deepStrictEqual(
          again.map((one) => one.places),
          [[1]],
          "only the record of the partition that did not answer"
        )
        for (const one of again) {
          const more = yield* Effect.promise(() => send({ acks: -1, topicMessages: one.topicMessages }))
          assert.isUndefined(recordAnswers(built, one.places, assigned, more, -1))
        }
        assert.deepStrictEqual([...written].sort(), ["a@0", "b@1", "c@2", "d@3"], "each written once")
        assert.deepStrictEqual(
          built.acked.map((m) => [m?.partition, m?.offset]),
          [
            [0, 100n],
            [1, 100n],
            [2, 100n],
            [3, 100n]
          ]
        )
      })
  )

  it.effect(
    "a resend goes a request per partition, in order within each; as one if a record has no partition yet",
    () =>
      Effect.sync(() => {
        const assigned = new WeakMap<Message, number>()
        const records = ["a", "b", "c", "d", "e"].map(
          (value, index): KafkaClient.ProducerRecord => ({ topic: index < 4 ? "t" : "u", key: null, value })
        )
        const messages = records.map((record): Message => ({ value: String(record.value) }))
        const built: Built = { records, messages, acked: new Array(records.length) }
        const places = [0, 1, 2, 3, 4]
        assert.deepStrictEqual(
          byPartition(built, places, assigned).map((one) => one.places),
          [places],
          "not partitioned yet: one request"
        )
        for (const [index, partition] of [0, 1, 0, 1, 0].entries()) assigned.set(messages[index] as Message, partition)
        const requests = byPartition(built, places, assigned)
        assert.deepStrictEqual(
          requests.map((one) => one.places),
          [[0, 2], [1, 3], [4]]
        )
        assert.deepStrictEqual(
          requests.map((one) =>
            one.topicMessages.map(({ topic, messages }) => `${topic}:${messages.map((m) => String(m.value)).join("")}`)
          ),
          [["t:ac"], ["t:bd"], ["u:e"]]
        )
      })
  )

  it.effect("metadata: each record's offset is its partition's base offset plus its place in the request", () =>
    Effect.gen(function* () {
      const produced = records(["a", "b", "c"], "k").map((record, index) => ({ ...record, partition: index % 2 }))
      const messages = produced.map((record, index): Message => ({ value: String(record.value), partition: index % 2 }))
      const responses: Array<RecordMetadata> = [
        { topicName: "t", partition: 0, errorCode: 0, baseOffset: "10" },
        { topicName: "t", partition: 1, errorCode: 0, baseOffset: "20" }
      ]
      const metadata = yield* metadataOf(produced, messages, new WeakMap(), responses, -1)
      assert.deepStrictEqual(
        metadata.map((m) => [m.partition, m.offset]),
        [
          [0, 10n],
          [1, 20n],
          [0, 11n]
        ]
      )
      const unacknowledged = yield* metadataOf(produced, messages, new WeakMap(), [], 0)
      assert.deepStrictEqual(
        unacknowledged.map((m) => m.offset),
        [-1n, -1n, -1n]
      )
    })
  )
})
