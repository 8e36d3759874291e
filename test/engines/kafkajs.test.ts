import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import KafkaJS, {
  KafkaJSConnectionError,
  KafkaJSGroupCoordinatorNotFound,
  KafkaJSNonRetriableError,
  KafkaJSNumberOfRetriesExceeded,
  KafkaJSProtocolError,
  KafkaJSRequestTimeoutError,
  KafkaJSSASLAuthenticationError
} from "kafkajs"
import { bridgedLevel, reasonOf, registerCodecs, retriableOnFreshProducer } from "../../src/engines/kafkajs/KafkaJS.ts"
import { CodecError, CodecUnavailable } from "../../src/internal/codecs.ts"
import * as KafkaClient from "../../src/KafkaClient.ts"

// kafkajs' error classes, built as kafkajs builds them, mapped to our reasons.
const connectionError = (message: string, code?: string) =>
  new KafkaJSConnectionError(message, { broker: "127.0.0.1:9092", ...(code && { code }) } as never)

describe("kafkajs errors → KafkaError reasons", () => {
  it.effect("a refused connection is ConnectionFailed (retriable)", () =>
    Effect.sync(() => {
      const reason = reasonOf(connectionError("Connection error: connect ECONNREFUSED", "ECONNREFUSED"), "b:9092")
      assert.strictEqual(reason._tag, "ConnectionFailed")
    })
  )

  it.effect("a certificate problem, even wrapped in 'retries exceeded', is TlsFailed", () =>
    Effect.sync(() => {
      const inner = connectionError(
        "Connection error: self-signed certificate in certificate chain",
        "SELF_SIGNED_CERT_IN_CHAIN"
      )
      const wrapped = new KafkaJSNumberOfRetriesExceeded(inner, { retryCount: 0, retryTime: 100 })
      assert.strictEqual(reasonOf(wrapped, "b:9093")._tag, "TlsFailed")
    })
  )

  it.effect("a refused connection wrapped twice by nested kafkajs retriers is still ConnectionFailed (retriable)", () =>
    Effect.sync(() => {
      // What a send gets while the broker is down: the broker pool's retrier gives up on connecting
      // (retries exceeded), and the producer's retrier wraps that, not retriable itself, as kafkajs' retry does.
      const refused = connectionError("Connection error: connect ECONNREFUSED 127.0.0.1:9092", "ECONNREFUSED")
      const exhausted = new KafkaJSNumberOfRetriesExceeded(refused, { retryCount: 2, retryTime: 300 })
      const wrapped = Reflect.construct(KafkaJSNonRetriableError, [exhausted, { cause: exhausted.cause ?? exhausted }])
      const reason = reasonOf(wrapped, "b:9092")
      assert.strictEqual(reason._tag, "ConnectionFailed")
    })
  )

  it.effect("a non-retriable Kafka error wrapped by kafkajs' retrier keeps its name and stays non-retriable", () =>
    Effect.sync(() => {
      const outOfOrder = new KafkaJSProtocolError({
        type: "OUT_OF_ORDER_SEQUENCE_NUMBER",
        code: 45,
        retriable: false,
        message: "out of order"
      } as never)
      const wrapped = Reflect.construct(KafkaJSNonRetriableError, [outOfOrder, { cause: outOfOrder }])
      const reason = reasonOf(wrapped, "b")
      assert.isTrue(
        reason._tag === "BrokerError" && reason.type === "OUT_OF_ORDER_SEQUENCE_NUMBER" && !reason.retriable
      )
    })
  )

  it.effect("SASL authentication errors are AuthenticationFailed", () =>
    Effect.sync(() => {
      // kafkajs types this constructor without arguments; at run time it takes the message like the others.
      const reason = reasonOf(
        Reflect.construct(KafkaJSSASLAuthenticationError, ["SASL SCRAM SHA256 authentication failed"]),
        "b"
      )
      assert.strictEqual(reason._tag, "AuthenticationFailed")
    })
  )

  it.effect("request timeouts are RequestTimedOut", () =>
    Effect.sync(() => {
      assert.strictEqual(
        reasonOf(new KafkaJSRequestTimeoutError("Request Produce timed out"), "b")._tag,
        "RequestTimedOut"
      )
    })
  )

  it.effect("no broker naming the group's coordinator just now is retriable, also wrapped by kafkajs' retrier", () =>
    Effect.sync(() => {
      // kafkajs marks it non-retriable; a consumer restarted after it would be reported at ERROR after a broker restart.
      // Built as kafkajs builds it (its type declaration takes no message).
      const notFound = Reflect.construct(KafkaJSGroupCoordinatorNotFound, ["Failed to find group coordinator"])
      assert.isFalse(notFound.retriable, "kafkajs' own flag")
      const wrapped = Reflect.construct(KafkaJSNonRetriableError, [notFound, { cause: notFound }])
      for (const error of [notFound, wrapped]) {
        const reason = reasonOf(error, "b")
        assert.strictEqual(reason._tag, "ClientFailed")
        assert.isTrue(reason._tag === "ClientFailed" && reason.retriable, String(reason))
      }
    })
  )

  it.effect("protocol errors keep Kafka's error name and retriability", () =>
    Effect.sync(() => {
      const retriable = reasonOf(
        new KafkaJSProtocolError({
          type: "NOT_LEADER_OR_FOLLOWER",
          code: 6,
          retriable: true,
          message: "moved"
        } as never),
        "b"
      )
      assert.deepStrictEqual(
        retriable._tag === "BrokerError" && { type: retriable.type, retriable: retriable.retriable },
        { type: "NOT_LEADER_OR_FOLLOWER", retriable: true }
      )
      const fatal = reasonOf(
        new KafkaJSProtocolError({
          type: "MESSAGE_TOO_LARGE",
          code: 10,
          retriable: false,
          message: "too big"
        } as never),
        "b"
      )
      assert.isTrue(fatal._tag === "BrokerError" && !fatal.retriable)
    })
  )

  it.effect("a producer id or sequence the broker forgot is retriable for the idempotent producer (a fresh one)", () =>
    Effect.sync(() => {
      const produceError = (type: string, code: number) =>
        new KafkaClient.KafkaError({
          operation: "produce",
          topic: "t",
          reason: reasonOf(new KafkaJSProtocolError({ type, code, retriable: false, message: type } as never), "b")
        })
      for (const [type, code] of [
        ["UNKNOWN_PRODUCER_ID", 59],
        ["OUT_OF_ORDER_SEQUENCE_NUMBER", 45]
      ] as const) {
        const before = produceError(type, code)
        assert.isFalse(before.retriable, `kafkajs gives ${type} up`)
        const after = retriableOnFreshProducer(before)
        assert.isTrue(after.retriable, type)
        assert.strictEqual(after.reason._tag === "BrokerError" && after.reason.type, type)
        assert.strictEqual(after.topic, "t")
      }
      assert.isFalse(retriableOnFreshProducer(produceError("MESSAGE_TOO_LARGE", 10)).retriable)
    })
  )

  it.effect(
    "kafkajs' own lines go no higher than Warn (our operations report their outcomes), the routine ones to Info, its progress to Debug",
    () =>
      Effect.sync(() => {
        const ERROR = 1 as Parameters<typeof bridgedLevel>[0]
        const WARN = 2 as Parameters<typeof bridgedLevel>[0]
        const routine: Array<[string, Record<string, unknown>]> = [
          [
            "Response Heartbeat(key: 12, version: 3)",
            { error: "The group is rebalancing, so a rejoin is needed", type: "REBALANCE_IN_PROGRESS" }
          ],
          [
            "Response InitProducerId(key: 22, version: 1)",
            { error: "The coordinator is loading and hence can't process requests for this group" }
          ],
          [
            "Response OffsetCommit(key: 8, version: 5)",
            { error: "This is not the correct coordinator for this group" }
          ],
          ["Response Metadata(key: 3, version: 6)", { error: "This server does not host this topic-partition" }],
          ["The coordinator is not aware of this member, re-joining the group", {}],
          ["Restarting the consumer in 300ms", {}]
        ]
        for (const [message, fields] of routine)
          assert.strictEqual(bridgedLevel(ERROR, message, fields), "Info", message)
        for (const message of [
          "Connection error: connect ECONNREFUSED 127.0.0.1:9092",
          "Failed to connect to seed broker, trying another broker from the list: Connection error: connect ECONNREFUSED"
        ]) {
          assert.strictEqual(bridgedLevel(ERROR, message, {}), "Debug", `retryConnect reports it: ${message}`)
        }
        for (const message of [
          "Crash: KafkaJSNumberOfRetriesExceeded: a handler bug",
          "Request Produce(key: 0, version: 7) timed out"
        ]) {
          assert.strictEqual(bridgedLevel(ERROR, message, {}), "Warn", message)
        }
        assert.strictEqual(
          bridgedLevel(ERROR, "Response Produce(key: 0, version: 7)", {
            error: "not authorized",
            type: "TOPIC_AUTHORIZATION_FAILED"
          }),
          "Warn",
          "the send that failed reports it"
        )
        assert.strictEqual(bridgedLevel(WARN, "The group is rebalancing, re-joining", {}), "Info")
        assert.strictEqual(
          bridgedLevel(4 as Parameters<typeof bridgedLevel>[0], "Starting", {}),
          "Debug",
          "its own progress"
        )
      })
  )

  it.effect("anything else is ClientFailed with kafkajs' retriable flag", () =>
    Effect.sync(() => {
      const reason = reasonOf(new Error("boom"), "b")
      assert.isTrue(reason._tag === "ClientFailed" && !reason.retriable)
    })
  )

  it.effect("a batch whose attributes name a codec Kafka does not have fails as a corrupt batch, not as garbage", () =>
    Effect.promise(async () => {
      registerCodecs()
      const table = KafkaJS.CompressionCodecs as unknown as Record<
        number,
        () => { decompress: (b: Buffer) => Promise<Buffer> }
      >
      for (const id of [5, 6, 7]) {
        const failure = await table[id]?.()
          .decompress(Buffer.from("x"))
          .then(
            () => undefined,
            (error: unknown) => error
          )
        assert.instanceOf(failure, CodecError)
        const reason = reasonOf(failure, "b:9092")
        assert.strictEqual(reason._tag, "CorruptBatch")
      }
    })
  )

  it.effect(
    "a corrupt gzip batch is a CorruptBatch too (our codec replaces kafkajs' own); a codec that cannot load is not",
    () =>
      Effect.promise(async () => {
        registerCodecs()
        const table = KafkaJS.CompressionCodecs as unknown as Record<
          number,
          () => { decompress: (b: Buffer) => Promise<Buffer> }
        >
        const failure = await table[1]?.()
          .decompress(Buffer.from("not gzip at all"))
          .then(
            () => undefined,
            (error: unknown) => error
          )
        assert.strictEqual(reasonOf(failure, "b:9092")._tag, "CorruptBatch")
        const unavailable = reasonOf(new CodecUnavailable("snappy", new Error("no prebuilt binary")), "b:9092")
        assert.strictEqual(unavailable._tag, "CodecUnavailable")
      })
  )
})
