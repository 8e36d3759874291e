import * as Fs from "node:fs"
import { afterAll, assert, beforeAll, describe, it } from "@effect/vitest"
import { Duration, Effect, Exit, Scope } from "effect"
import { type Kafka, KafkaJSSASLAuthenticationError, type SASLOptions } from "kafkajs"
import * as Broker from "../../scripts/kafka/broker.ts"
import { testKafka, uniqueName } from "../support/smoke.ts"
import { otherCaFile } from "../support/tls.ts"

const alice = { username: "alice", password: "alice-secret" }

/** kafkajs' settings for alice with `password`, one per mechanism of the SASL listener. */
const aliceWith = (password: string): ReadonlyArray<SASLOptions> => [
  { mechanism: "scram-sha-256", username: alice.username, password },
  { mechanism: "scram-sha-512", username: alice.username, password },
  { mechanism: "plain", username: alice.username, password }
]

// One broker with both security listeners for the file: starting it is most of the file's time.
const scope = Effect.runSync(Scope.make())
let broker: Broker.Broker
beforeAll(async () => {
  broker = await Effect.runPromise(Broker.acquire({ sasl: { users: [alice] }, tls: true }).pipe(Scope.provide(scope)))
})
afterAll(() => Effect.runPromise(Scope.close(scope, Exit.void)))

/** Connects an admin client and lists the topics; a failure is kafkajs' own error, for the test to inspect. */
const listTopics = (kafka: Kafka) =>
  Effect.acquireUseRelease(
    Effect.sync(() => kafka.admin()),
    (admin) =>
      Effect.tryPromise({
        try: async () => {
          await admin.connect()
          return await admin.listTopics()
        },
        catch: (cause) => cause
      }),
    (admin) => Effect.promise(() => admin.disconnect())
  )

/** Creates a topic through `kafka` (deleted with the scope) and returns its name with the topics listed after. */
const createAndListTopic = (kafka: Kafka) =>
  Effect.gen(function* () {
    const admin = yield* Effect.acquireRelease(
      Effect.promise(async () => {
        const admin = kafka.admin()
        await admin.connect()
        return admin
      }),
      (admin) => Effect.promise(() => admin.disconnect())
    )
    const topic = uniqueName("security")
    yield* Effect.acquireRelease(
      Effect.promise(() => admin.createTopics({ topics: [{ topic }], waitForLeaders: true })),
      () => Effect.promise(() => admin.deleteTopics({ topics: [topic] }))
    )
    return { topic, listed: yield* Effect.promise(() => admin.listTopics()) }
  })

/** A CA the broker's certificate was not signed by, as PEM. */
const otherCa = Effect.map(otherCaFile, (file) => Fs.readFileSync(file, "utf8"))

describe("scripts/kafka/broker: SASL and TLS listeners", () => {
  it.live.each(aliceWith(alice.password))("$mechanism with the right password creates and lists a topic", (sasl) =>
    Effect.gen(function* () {
      assert.isDefined(broker.saslBrokers)
      const kafka = testKafka(broker.saslBrokers ?? "", "kafka-effect-security", { sasl })
      const { topic, listed } = yield* createAndListTopic(kafka)
      assert.include(listed, topic)
    }).pipe(Effect.scoped)
  )

  it.live.each(aliceWith("not-alice-secret"))(
    "$mechanism with a wrong password fails fast with kafkajs' authentication error",
    (sasl) =>
      Effect.gen(function* () {
        const kafka = testKafka(broker.saslBrokers ?? "", "kafka-effect-security", {
          sasl,
          retry: { retries: 0 }
        })
        const [elapsed, exit] = yield* Effect.timed(Effect.exit(listTopics(kafka)))

        assert.isTrue(Exit.isFailure(exit), "the connection is refused")
        const error = Exit.findErrorOption(exit)
        assert.isTrue(error._tag === "Some", "with kafkajs' error, not a defect")
        if (error._tag === "Some") {
          assert.instanceOf(error.value, KafkaJSSASLAuthenticationError)
          assert.strictEqual(error.value.name, "KafkaJSSASLAuthenticationError")
        }
        assert.isBelow(Duration.toMillis(elapsed), 10_000)
      })
  )

  it.live("TLS with the generated CA creates and lists a topic", () =>
    Effect.gen(function* () {
      assert.isDefined(broker.tlsBrokers)
      assert.isDefined(broker.caFile)
      const ca = Fs.readFileSync(broker.caFile ?? "", "utf8")
      const kafka = testKafka(broker.tlsBrokers ?? "", "kafka-effect-security", { ssl: { ca: [ca] } })
      const { topic, listed } = yield* createAndListTopic(kafka)
      assert.include(listed, topic)
    }).pipe(Effect.scoped)
  )

  it.live("TLS trusting another CA fails with a certificate verification error", () =>
    Effect.gen(function* () {
      const kafka = testKafka(broker.tlsBrokers ?? "", "kafka-effect-security", {
        ssl: { ca: [yield* otherCa] },
        retry: { retries: 0 }
      })
      const exit = yield* Effect.exit(listTopics(kafka))

      assert.isTrue(Exit.isFailure(exit), "the connection is refused")
      const error = Exit.findErrorOption(exit)
      assert.isTrue(error._tag === "Some", "with kafkajs' error, not a defect")
      if (error._tag === "Some") {
        assert.instanceOf(error.value, Error)
        assert.match(error.value.message, /self-signed certificate|unable to (verify|get local issuer)/)
      }
    }).pipe(Effect.scoped)
  )
})
