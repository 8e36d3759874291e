/**
 * The @platformatic/kafka adapter's own logic, without a broker: how the library's errors map to our reasons, how
 * fetched batches become records, and where a corrupt batch is placed. Its behaviour against a broker is the
 * contract suite's and the broker tests' (KAFKA_CLIENT=platformatic).
 */
import { assert, describe, it } from "@effect/vitest"
import {
  AuthenticationError,
  MultipleErrors,
  NetworkError,
  ProtocolError,
  type RecordsBatch,
  TimeoutError,
  UserError
} from "@platformatic/kafka"
import { Effect } from "effect"
import {
  batchOffsetsOf,
  located,
  nodeSupported,
  reasonOf,
  toRecords
} from "../../src/engines/platformatic/Platformatic.ts"
import * as KafkaClient from "../../src/KafkaClient.ts"

describe("@platformatic/kafka errors → KafkaError reasons", () => {
  it.effect("a refused connection, however wrapped, is ConnectionFailed (retriable)", () =>
    Effect.sync(() => {
      const refused = new MultipleErrors("Cannot connect to any broker.", [
        new NetworkError("Connection to 127.0.0.1:1 failed.", { cause: new Error("connect ECONNREFUSED") })
      ])
      const reason = reasonOf(refused, "127.0.0.1:1")
      assert.strictEqual(reason._tag, "ConnectionFailed")
      assert.isTrue(new KafkaClient.KafkaError({ operation: "connect", reason }).retriable)
    })
  )

  it.effect("bad credentials inside the retriable NetworkError the library wraps them in are not retriable", () =>
    Effect.sync(() => {
      const error = new NetworkError("Connection to b:9094 failed.", {
        cause: new AuthenticationError("SASL authentication failed.")
      })
      const reason = reasonOf(error, "b:9094")
      assert.strictEqual(reason._tag, "AuthenticationFailed")
      assert.isFalse(new KafkaClient.KafkaError({ operation: "connect", reason }).retriable)
    })
  )

  it.effect("a broker's error code keeps its name and whether it can be retried", () =>
    Effect.sync(() => {
      const notLeader = new MultipleErrors("Producing messages failed.", [new ProtocolError("NOT_LEADER_OR_FOLLOWER")])
      const reason = reasonOf(notLeader, "b:9092")
      assert.strictEqual(reason._tag, "BrokerError")
      assert.strictEqual(reason._tag === "BrokerError" && reason.type, "NOT_LEADER_OR_FOLLOWER")
      assert.isTrue(reason._tag === "BrokerError" && reason.retriable)
      const tooLarge = reasonOf(new ProtocolError("MESSAGE_TOO_LARGE"), "b:9092")
      assert.isFalse(tooLarge._tag === "BrokerError" && tooLarge.retriable)
    })
  )

  it.effect("an unknown topic, which the library reports only in words, is UnknownTopic with its name", () =>
    Effect.sync(() => {
      const reason = reasonOf(new UserError("Unknown topic orders."), "b:9092")
      assert.deepStrictEqual(reason, new KafkaClient.UnknownTopic({ topic: "orders" }))
    })
  )

  it.effect("a request timeout is RequestTimedOut; a connect timeout is ConnectionFailed", () =>
    Effect.sync(() => {
      assert.strictEqual(reasonOf(new TimeoutError("Request timed out"), "b")._tag, "RequestTimedOut")
      assert.strictEqual(reasonOf(new TimeoutError("Connection to b:9092 timed out."), "b")._tag, "ConnectionFailed")
    })
  )

  it.effect("a TLS handshake failure is TlsFailed", () =>
    Effect.sync(() => {
      const error = new NetworkError("Connection to b:9093 failed.", {
        cause: Object.assign(new Error("self-signed certificate"), { code: "SELF_SIGNED_CERT_IN_CHAIN" })
      })
      assert.strictEqual(reasonOf(error, "b:9093")._tag, "TlsFailed")
    })
  )
})

const batch = (options: Partial<RecordsBatch> & Pick<RecordsBatch, "firstOffset" | "records">): RecordsBatch => ({
  length: 0,
  partitionLeaderEpoch: 0,
  magic: 2,
  crc: 0,
  attributes: 0,
  lastOffsetDelta: options.records.length - 1,
  firstTimestamp: 1_000n,
  maxTimestamp: 9_000n,
  producerId: -1n,
  producerEpoch: -1,
  firstSequence: -1,
  ...options
})

const record = (offsetDelta: number, value: string, headers: Array<[string, string]> = []) => ({
  length: 0,
  attributes: 0,
  timestampDelta: BigInt(offsetDelta),
  offsetDelta,
  key: null,
  value: Buffer.from(value),
  headers: headers.map(([name, v]): [Buffer, Buffer] => [Buffer.from(name), Buffer.from(v)])
})

describe("fetched batches → records", () => {
  it.effect("records before the position asked for are left out (a compressed batch starts where it starts)", () =>
    Effect.sync(() => {
      const records = toRecords(
        "t",
        0,
        [batch({ firstOffset: 10n, records: [record(0, "a"), record(1, "b"), record(2, "c")] })],
        11n
      )
      assert.deepStrictEqual(
        records.map((r) => [r.offset, Buffer.from(r.value ?? []).toString()]),
        [
          [11n, "b"],
          [12n, "c"]
        ]
      )
      assert.strictEqual(records[0]?.timestamp, 1_001, "the batch's first timestamp plus the record's delta")
    })
  )

  it.effect("control batches are skipped; log-append time is the batch's max timestamp", () =>
    Effect.sync(() => {
      const records = toRecords(
        "t",
        0,
        [
          batch({ firstOffset: 0n, attributes: 0x20, records: [record(0, "commit marker")] }),
          batch({ firstOffset: 1n, attributes: 0x08, records: [record(0, "x")] })
        ],
        0n
      )
      assert.deepStrictEqual(
        records.map((r) => [r.offset, r.timestamp]),
        [[1n, 9_000]]
      )
    })
  )

  it.effect("a repeated header keeps every value in order, the last as `headers`' (Java's lastHeader)", () =>
    Effect.sync(() => {
      const [one] = toRecords(
        "t",
        0,
        [
          batch({
            firstOffset: 0n,
            records: [
              record(0, "v", [
                ["h", "1"],
                ["h", "2"],
                ["g", "x"]
              ])
            ]
          })
        ],
        0n
      )
      const text = (bytes: Uint8Array | undefined) => Buffer.from(bytes ?? []).toString()
      assert.strictEqual(text(one?.headers.h), "2")
      assert.strictEqual(text(one?.headers.g), "x")
      assert.deepStrictEqual(one?.repeatedHeaders?.h?.map(text), ["1", "2"])
      assert.isUndefined(one?.repeatedHeaders?.g)
    })
  )
})

describe("READ_COMMITTED: aborted transactions left out, as the Java client leaves them out", () => {
  const marker = (type: 0 | 1) => {
    const key = Buffer.alloc(4)
    key.writeInt16BE(type, 2)
    return { ...record(0, ""), key, value: null }
  }
  const txn = (firstOffset: bigint, producerId: bigint, values: Array<string>) =>
    batch({ firstOffset, producerId, attributes: 0x10, records: values.map((v, i) => record(i, v)) })
  const control = (firstOffset: bigint, producerId: bigint, type: 0 | 1) =>
    batch({ firstOffset, producerId, attributes: 0x30, records: [marker(type)] })
  const values = (records: ReadonlyArray<{ readonly value: Uint8Array | null }>) =>
    records.map((r) => Buffer.from(r.value ?? []).toString())

  it.effect("a producer's aborted, committed and aborted again transactions: only the committed one is read", () =>
    Effect.sync(() => {
      const batches = [
        txn(0n, 7n, ["a1", "a2"]),
        control(2n, 7n, 0),
        txn(3n, 7n, ["c1"]),
        control(4n, 7n, 1),
        txn(5n, 7n, ["a3"]),
        control(6n, 7n, 0)
      ]
      const aborted = [
        { producerId: 7n, firstOffset: 0n },
        { producerId: 7n, firstOffset: 5n }
      ]
      assert.deepStrictEqual(values(toRecords("t", 0, batches, 0n, aborted)), ["c1"])
    })
  )

  it.effect("an aborted transaction whose marker is in a later fetch is left out all the same", () =>
    Effect.sync(() => {
      const batches = [txn(10n, 8n, ["x1", "x2"]), batch({ firstOffset: 12n, records: [record(0, "plain")] })]
      assert.deepStrictEqual(values(toRecords("t", 0, batches, 10n, [{ producerId: 8n, firstOffset: 10n }])), ["plain"])
      // Another producer's transactional records are not touched.
      assert.deepStrictEqual(
        values(toRecords("t", 0, [txn(10n, 9n, ["y"])], 10n, [{ producerId: 8n, firstOffset: 10n }])),
        ["y"]
      )
    })
  )
})

describe("a corrupt batch", () => {
  it.effect("its offsets are read from the header in front of its compressed records", () =>
    Effect.sync(() => {
      const bytes = Buffer.alloc(61 + 5)
      bytes.writeBigInt64BE(42n, 0)
      bytes.writeInt32BE(61 - 12 + 5, 8)
      bytes.writeInt8(2, 16)
      bytes.writeInt32BE(7, 23)
      assert.deepStrictEqual(batchOffsetsOf(bytes.subarray(61)), { first: 42n, last: 49n })
      // Not a view of a batch: nothing guessed.
      assert.isUndefined(batchOffsetsOf(Buffer.alloc(5)))
      bytes.writeInt8(1, 16)
      assert.isUndefined(batchOffsetsOf(bytes.subarray(61)))
    })
  )

  it.effect("is placed in the partition fetched from an offset inside it", () =>
    Effect.sync(() => {
      const asked = new Map([
        ["t\u00000", 5n],
        ["t\u00001", 100n]
      ])
      const reason = new KafkaClient.CorruptBatch({
        codec: "snappy",
        detail: "x",
        firstOffset: "90",
        lastOffset: "120",
        partitions: []
      })
      const where = located(reason, asked)
      assert.strictEqual("partition" in where ? where.partition : undefined, 1)
      assert.deepStrictEqual(where.reason._tag === "CorruptBatch" && where.reason.partitions, [
        { topic: "t", partition: 1 }
      ])
    })
  )
})

describe("the Node floor of @platformatic/kafka", () => {
  it.effect("22.22+ in 22, 24.6+ in 24", () =>
    Effect.sync(() => {
      assert.isFalse(nodeSupported("22.19.0"))
      assert.isTrue(nodeSupported("22.22.0"))
      assert.isFalse(nodeSupported("24.5.1"))
      assert.isTrue(nodeSupported("24.21.0"))
      assert.isTrue(nodeSupported("26.0.0"))
    })
  )
})
