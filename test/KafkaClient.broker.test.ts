/**
 * The kafkajs engine against a real broker with SASL and TLS listeners: the right credentials connect,
 * wrong ones fail at once with a typed error (no retry storm), and secrets never reach the logs.
 */
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Effect, Exit, Layer, Logger, Option, Scope } from "effect"
import * as Broker from "../scripts/kafka/broker.ts"
import * as KafkaClient from "../src/KafkaClient.ts"
import { clientLayer } from "./support/kafka.ts"
import { otherCaFile } from "./support/tls.ts"

const alice = { username: "alice", password: "alice-s3cret-pw" }

// One broker with both security listeners for the file.
const scope = Effect.runSync(Scope.make())
let broker: Broker.Broker
beforeAll(async () => {
  broker = await Effect.runPromise(Broker.acquire({ sasl: { users: [alice] }, tls: true }).pipe(Scope.provide(scope)))
})
afterAll(() => Effect.runPromise(Scope.close(scope, Exit.void)))

/** Every log line the code under test writes, as text. */
const capturedLogs = () => {
  const lines: Array<string> = []
  const logger = Logger.make(({ message, logLevel }) => {
    lines.push(`${logLevel} ${JSON.stringify(message)}`)
  })
  return { lines, layer: Logger.layer([logger]) }
}

/** Builds our client with `env` and lists topics; the outcome and the logs, for the test to inspect. */
const listTopicsWith = (brokers: string, env: Record<string, string>) =>
  Effect.gen(function* () {
    const logs = capturedLogs()
    const startedAt = performance.now()
    const exit = yield* Effect.gen(function* () {
      const client = yield* KafkaClient.KafkaClient
      return yield* client.admin.listTopics
    }).pipe(
      Effect.provide(
        clientLayer(brokers, { KAFKA_CONNECTION_TIMEOUT_MS: "3000", ...env }).pipe(Layer.provide(logs.layer))
      ),
      Effect.provide(logs.layer),
      Effect.exit
    )
    return { exit, logs: logs.lines, seconds: (performance.now() - startedAt) / 1000 }
  })

const reasonOf = (exit: Exit.Exit<unknown, unknown>) => {
  const error = Exit.findErrorOption(exit)
  return error._tag === "Some" && error.value instanceof KafkaClient.KafkaError ? error.value.reason._tag : "none"
}

describe("the kafkajs engine with SASL and TLS", () => {
  for (const mechanism of ["scram-sha-256", "scram-sha-512", "plain"] as const) {
    it.live(`SASL ${mechanism} with the right password connects`, () =>
      Effect.gen(function* () {
        const { exit, logs } = yield* listTopicsWith(broker.saslBrokers ?? "", {
          KAFKA_SASL_MECHANISM: mechanism,
          KAFKA_SASL_USERNAME: alice.username,
          KAFKA_SASL_PASSWORD: alice.password
        })
        assert.isTrue(Exit.isSuccess(exit), String(exit))
        assert.isFalse(
          logs.some((line) => line.includes(alice.password)),
          "the password is never logged"
        )
      })
    )

    it.live(`SASL ${mechanism} with a wrong password fails fast with AuthenticationFailed, tried once`, () =>
      Effect.gen(function* () {
        const { exit, logs, seconds } = yield* listTopicsWith(broker.saslBrokers ?? "", {
          KAFKA_SASL_MECHANISM: mechanism,
          KAFKA_SASL_USERNAME: alice.username,
          KAFKA_SASL_PASSWORD: "not-alices-password"
        })
        assert.strictEqual(reasonOf(exit), "AuthenticationFailed")
        assert.isFalse(
          logs.some((line) => line.includes("Kafka not reachable")),
          "no reconnect attempt for bad credentials"
        )
        assert.isBelow(seconds, 10, "fails at once, not after a retry storm")
        assert.isFalse(
          logs.some((line) => line.includes("not-alices-password")),
          "the password is never logged"
        )
        assert.notInclude(String(exit), "not-alices-password")
      })
    )
  }

  it.live("TLS with the broker's CA connects", () =>
    Effect.gen(function* () {
      const { exit } = yield* listTopicsWith(broker.tlsBrokers ?? "", { KAFKA_TLS_CA_FILE: broker.caFile ?? "" })
      assert.isTrue(Exit.isSuccess(exit), String(exit))
    })
  )

  it.live("TLS with another CA fails fast with TlsFailed, tried once", () =>
    Effect.gen(function* () {
      const caFile = yield* otherCaFile
      const { exit, logs, seconds } = yield* listTopicsWith(broker.tlsBrokers ?? "", { KAFKA_TLS_CA_FILE: caFile })
      assert.strictEqual(reasonOf(exit), "TlsFailed")
      assert.isFalse(logs.some((line) => line.includes("Kafka not reachable")))
      assert.isBelow(seconds, 10)
    }).pipe(Effect.scoped)
  )

  it.live("a CA file that cannot be read is a configuration error naming the variable, before anything connects", () =>
    Effect.gen(function* () {
      const { exit } = yield* listTopicsWith(broker.tlsBrokers ?? "", { KAFKA_TLS_CA_FILE: "/nonexistent/ca.pem" })
      const error = Option.getOrUndefined(Exit.findErrorOption(exit))
      assert.strictEqual((error as { _tag?: string } | undefined)?._tag, "KafkaConfigError")
      assert.include(
        String(exit),
        'KAFKA_TLS_CA_FILE is "/nonexistent/ca.pem"; expected the path of a readable PEM CA file'
      )
    })
  )
})
