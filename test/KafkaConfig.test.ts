import * as Fs from "node:fs"
import * as Os from "node:os"
import * as Path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { ConfigProvider, Duration, Effect, Option, Redacted } from "effect"
import * as KafkaConfig from "../src/KafkaConfig.ts"

// Files the TLS and SASL variables name are read at start-up: real ones, in a directory of the test run's own.
const files = Fs.mkdtempSync(Path.join(Os.tmpdir(), "kafka-effect-config-"))
const file = (name: string, content: string) => {
  const path = Path.join(files, name)
  Fs.writeFileSync(path, content)
  return path
}
const pem = (name: string) => file(name, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
const caPem = pem("ca.pem")

const load = (env: Record<string, string>) =>
  KafkaConfig.all.pipe(Effect.provide(ConfigProvider.layer(ConfigProvider.fromEnv({ env }))))

const problemsOf = (env: Record<string, string>) =>
  load(env).pipe(
    Effect.flip,
    Effect.map((error) => error.problems)
  )

describe("KafkaConfig", () => {
  it.effect("defaults are the Go example's", () =>
    Effect.gen(function* () {
      const config = yield* load({})
      assert.deepStrictEqual(config.connection.brokers, ["localhost:9092"])
      assert.strictEqual(config.producer.topic, "events")
      assert.strictEqual(config.producer.acks, -1)
      assert.strictEqual(config.producer.retries, 3)
      assert.isTrue(config.producer.idempotent)
      assert.strictEqual(config.consumer.topic, "events")
      assert.strictEqual(config.consumer.groupId, "event-processor-group")
      assert.strictEqual(config.consumer.workers, 5)
      assert.strictEqual(config.consumer.retryMax, 3)
      assert.strictEqual(config.consumer.fetchMinBytes, 1024)
      assert.strictEqual(config.consumer.fetchMaxBytes, 10_485_760)
      assert.strictEqual(config.consumer.retryTopicPrefix, "events-retry")
      assert.strictEqual(config.consumer.dlqTopic, "events-dlq")
      assert.strictEqual(config.logging.level, "Info")
      assert.isTrue(Option.isNone(config.logging.format))
      assert.isTrue(Option.isNone(config.connection.sasl))
      assert.isTrue(Option.isNone(config.connection.tls))
    })
  )

  it.effect("every variable is read", () =>
    Effect.gen(function* () {
      const config = yield* load({
        KAFKA_BROKERS: "kafka-1:9092, kafka-2:9093,10.0.0.7:9094",
        KAFKA_CLIENT_ID: "billing",
        KAFKA_SASL_MECHANISM: "SCRAM-SHA-512",
        KAFKA_SASL_USERNAME: "alice",
        KAFKA_SASL_PASSWORD: "alice-secret",
        KAFKA_TLS_CA_FILE: caPem,
        KAFKA_CONNECTION_TIMEOUT_MS: "2500",
        KAFKA_REQUEST_TIMEOUT_MS: "15000",
        KAFKA_RECONNECT_BACKOFF_MS: "100",
        KAFKA_RECONNECT_BACKOFF_MAX_MS: "5000",
        KAFKA_PRODUCER_TOPIC: "orders",
        KAFKA_PRODUCER_ACKS: "1",
        KAFKA_PRODUCER_RETRIES: "7",
        KAFKA_PRODUCER_IDEMPOTENT: "false",
        KAFKA_PRODUCER_LINGER_MS: "20",
        KAFKA_PRODUCER_BATCH_SIZE: "1000",
        KAFKA_PRODUCER_QUEUE_CAPACITY: "50000",
        KAFKA_PRODUCER_FLUSH_TIMEOUT_MS: "5000",
        KAFKA_PRODUCER_COMPRESSION: "zstd",
        KAFKA_CONSUMER_TOPIC: "orders",
        KAFKA_CONSUMER_GROUP_ID: "billing-group",
        KAFKA_CONSUMER_WORKERS: "64",
        KAFKA_CONSUMER_RETRY_MAX: "5",
        KAFKA_CONSUMER_FETCH_MIN_BYTES: "1",
        KAFKA_CONSUMER_FETCH_MAX_BYTES: "1048576",
        KAFKA_CONSUMER_FETCH_MAX_WAIT_MS: "250",
        KAFKA_RETRY_TOPIC_PREFIX: "orders-retry",
        KAFKA_DLQ_TOPIC: "orders-dlq",
        KAFKA_RETRY_DELAYS_MS: "1000, 60000",
        KAFKA_CREATE_TOPICS: "true",
        KAFKA_TOPIC_PARTITIONS: "12",
        KAFKA_CONSUMER_MAX_IN_FLIGHT: "2000",
        KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "1000",
        KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS: "10000",
        KAFKA_CONSUMER_FROM_BEGINNING: "false",
        KAFKA_CONSUMER_SESSION_TIMEOUT_MS: "20000",
        KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS: "2000",
        KAFKA_CLIENT: "platformatic",
        KAFKA_CONSUMER_GROUP_PROTOCOL: "consumer",
        LOG_LEVEL: "debug",
        LOG_FORMAT: "json"
      })
      const { connection, producer, consumer } = config
      assert.deepStrictEqual(connection.brokers, ["kafka-1:9092", "kafka-2:9093", "10.0.0.7:9094"])
      assert.strictEqual(connection.clientId, "billing")
      assert.strictEqual(connection.engine, "platformatic")
      const sasl = Option.getOrThrow(connection.sasl)
      assert.strictEqual(sasl.mechanism, "scram-sha-512")
      assert.strictEqual(sasl.username, "alice")
      assert.strictEqual(Redacted.value(sasl.password), "alice-secret")
      assert.deepStrictEqual(Option.getOrThrow(connection.tls).caFile, Option.some(caPem))
      assert.strictEqual(Duration.toMillis(connection.connectionTimeout), 2500)
      assert.strictEqual(Duration.toMillis(connection.requestTimeout), 15000)
      assert.strictEqual(Duration.toMillis(connection.reconnectBackoff), 100)
      assert.strictEqual(Duration.toMillis(connection.reconnectBackoffMax), 5000)
      assert.deepStrictEqual(
        {
          ...producer,
          linger: Duration.toMillis(producer.linger),
          flushTimeout: Duration.toMillis(producer.flushTimeout)
        },
        {
          topic: "orders",
          acks: 1,
          retries: 7,
          idempotent: false,
          linger: 20,
          batchSize: 1000,
          queueCapacity: 50000,
          flushTimeout: 5000,
          compression: "zstd"
        }
      )
      assert.deepStrictEqual(
        {
          ...consumer,
          commitInterval: Duration.toMillis(consumer.commitInterval),
          shutdownTimeout: Duration.toMillis(consumer.shutdownTimeout),
          sessionTimeout: Duration.toMillis(consumer.sessionTimeout),
          heartbeatInterval: Duration.toMillis(consumer.heartbeatInterval),
          retryDelays: consumer.retryDelays.map(Duration.toMillis),
          fetchMaxWait: Duration.toMillis(consumer.fetchMaxWait)
        },
        {
          topic: "orders",
          groupId: "billing-group",
          workers: 64,
          retryMax: 5,
          fetchMinBytes: 1,
          fetchMaxBytes: 1_048_576,
          fetchMaxWait: 250,
          retryTopicPrefix: "orders-retry",
          retryDelays: [1000, 60000],
          dlqTopic: "orders-dlq",
          createTopics: true,
          topicPartitions: 12,
          maxInFlight: 2000,
          commitInterval: 1000,
          shutdownTimeout: 10000,
          fromBeginning: false,
          sessionTimeout: 20000,
          heartbeatInterval: 2000,
          groupProtocol: "consumer"
        }
      )
      assert.strictEqual(config.logging.level, "Debug")
      assert.deepStrictEqual(config.logging.format, Option.some("json"))
    })
  )

  const bad: ReadonlyArray<readonly [string, string, string]> = [
    ["KAFKA_BROKERS", "localhost", "host:port"],
    ["KAFKA_CLIENT", "librdkafka", "kafkajs or platformatic"],
    ["KAFKA_CONSUMER_GROUP_PROTOCOL", "cooperative", "classic or consumer"],
    ["KAFKA_BROKERS", "localhost:99999", "ports 1-65535"],
    ["KAFKA_SASL_MECHANISM", "gssapi", "plain, scram-sha-256, scram-sha-512"],
    ["KAFKA_TLS", "maybe", "true or false"],
    ["KAFKA_CONNECTION_TIMEOUT_MS", "10s", "milliseconds"],
    ["KAFKA_REQUEST_TIMEOUT_MS", "50", "at least 100"],
    ["KAFKA_RECONNECT_BACKOFF_MS", "0", "at least 1"],
    ["KAFKA_RECONNECT_BACKOFF_MAX_MS", "-5", "milliseconds"],
    ["KAFKA_PRODUCER_TOPIC", "bad topic", "topic name"],
    ["KAFKA_PRODUCER_ACKS", "2", "all (or -1), 1 (or leader), 0 (or none)"],
    ["KAFKA_PRODUCER_RETRIES", "many", "0 to 1000"],
    ["KAFKA_PRODUCER_IDEMPOTENT", "perhaps", "true or false"],
    ["KAFKA_PRODUCER_LINGER_MS", "70000", "0 to 60000"],
    ["KAFKA_PRODUCER_BATCH_SIZE", "0", "1 to 100000"],
    ["KAFKA_PRODUCER_QUEUE_CAPACITY", "1.5", "whole number"],
    ["KAFKA_CONSUMER_TOPIC", "..", "topic name"],
    ["KAFKA_CONSUMER_WORKERS", "2000", "1 to 1024"],
    ["KAFKA_CONSUMER_RETRY_MAX", "-1", "0 to 100"],
    ["KAFKA_CONSUMER_FETCH_MIN_BYTES", "0", "bytes from 1"],
    ["KAFKA_CONSUMER_FETCH_MAX_BYTES", "lots", "bytes from 1"],
    ["KAFKA_RETRY_TOPIC_PREFIX", "retry/topic", "prefix"],
    ["KAFKA_DLQ_TOPIC", "dlq topic", "topic name"],
    ["KAFKA_CONSUMER_FETCH_MAX_WAIT_MS", "1s", "milliseconds from 0 to 60000"],
    ["KAFKA_RETRY_DELAYS_MS", "5s,30s", "comma-separated whole numbers of milliseconds"],
    ["KAFKA_RETRY_DELAYS_MS", "1000,,2000", "one per retry topic"],
    ["KAFKA_CREATE_TOPICS", "sometimes", "true or false"],
    ["KAFKA_TOPIC_PARTITIONS", "0", "1 to 10000"],
    ["KAFKA_CONSUMER_MAX_IN_FLIGHT", "0", "1 to 10000000"],
    ["KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "5", "10 to 3600000"],
    ["KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "-1", "0 to 3600000"],
    ["KAFKA_CONSUMER_FROM_BEGINNING", "earliest", "true or false"],
    ["KAFKA_CONSUMER_SESSION_TIMEOUT_MS", "500", "1000 to 3600000"],
    ["KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS", "1", "10 to 3600000"],
    ["LOG_LEVEL", "loud", "trace, debug, info, warn, error, fatal, none"],
    ["LOG_FORMAT", "xml", "json or pretty"]
  ]
  it.effect.each(bad)("%s=%s fails naming the variable, the value and the accepted form", ([variable, value, form]) =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({ [variable]: value })
      assert.strictEqual(problems.length, 1)
      const [problem] = problems
      assert.strictEqual(problem?.variable, variable)
      assert.strictEqual(problem?.value, value)
      assert.include(problem?.expected, form)
      assert.include(problem?.toString(), `${variable} is ${JSON.stringify(value)}`)
    })
  )

  it.effect("an empty value counts as unset", () =>
    Effect.gen(function* () {
      const config = yield* load({ KAFKA_CONSUMER_WORKERS: "  ", KAFKA_BROKERS: "" })
      assert.strictEqual(config.consumer.workers, 5)
      assert.deepStrictEqual(config.connection.brokers, ["localhost:9092"])
    })
  )

  it.effect("an IPv6 literal broker is refused at start-up: kafkajs would split it at its colons", () =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({ KAFKA_BROKERS: "[::1]:9092" })
      assert.strictEqual(problems[0]?.variable, "KAFKA_BROKERS")
      assert.include(problems[0]?.expected, "kafkajs cannot take IPv6 literals")
    })
  )

  it.effect("a password is taken as it is: spaces are part of it", () =>
    Effect.gen(function* () {
      const config = yield* load({
        KAFKA_SASL_MECHANISM: "plain",
        KAFKA_SASL_USERNAME: "alice",
        KAFKA_SASL_PASSWORD: " p w "
      })
      assert.strictEqual(
        Option.map(config.connection.sasl, (sasl) => Redacted.value(sasl.password)).pipe(Option.getOrThrow),
        " p w "
      )
    })
  )

  it.effect("every problem is reported at once", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(load({ KAFKA_BROKERS: "x", KAFKA_CONSUMER_WORKERS: "0", LOG_LEVEL: "loud" }))
      assert.deepStrictEqual(
        error.problems.map((problem) => problem.variable),
        ["KAFKA_BROKERS", "KAFKA_CONSUMER_WORKERS", "LOG_LEVEL"]
      )
      assert.include(error.message, 'KAFKA_CONSUMER_WORKERS is "0"')
    })
  )

  it.effect("a compression Kafka has no codec for is refused, naming the ones it has", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(load({ KAFKA_PRODUCER_COMPRESSION: "brotli" }))
      assert.include(error.message, 'KAFKA_PRODUCER_COMPRESSION is "brotli"; expected none, gzip, snappy, lz4 or zstd')
    })
  )

  describe("inconsistent combinations", () => {
    it.effect("idempotent with acks other than all", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_PRODUCER_ACKS: "1" })
        assert.strictEqual(problems[0]?.variable, "KAFKA_PRODUCER_ACKS")
        assert.include(problems[0]?.expected, "KAFKA_PRODUCER_IDEMPOTENT")
        // Turning idempotence off makes the same acks valid.
        const config = yield* load({ KAFKA_PRODUCER_ACKS: "1", KAFKA_PRODUCER_IDEMPOTENT: "false" })
        assert.strictEqual(config.producer.acks, 1)
      })
    )

    it.effect("idempotent with no retries", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_PRODUCER_RETRIES: "0" })
        assert.strictEqual(problems[0]?.variable, "KAFKA_PRODUCER_RETRIES")
      })
    )

    it.effect("fetch min bytes above fetch max bytes", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({
          KAFKA_CONSUMER_FETCH_MIN_BYTES: "2048",
          KAFKA_CONSUMER_FETCH_MAX_BYTES: "1024"
        })
        assert.strictEqual(problems[0]?.variable, "KAFKA_CONSUMER_FETCH_MIN_BYTES")
        // Only the maximum set: the minimum's default is what conflicts, and the message says so.
        const maxOnly = yield* problemsOf({ KAFKA_CONSUMER_FETCH_MAX_BYTES: "512" })
        assert.strictEqual(
          maxOnly[0]?.toString(),
          "KAFKA_CONSUMER_FETCH_MIN_BYTES is not set, so 1024 (its default); expected at most KAFKA_CONSUMER_FETCH_MAX_BYTES (512)"
        )
      })
    )

    it.effect("KIP-848's group protocol on an engine without it", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_CONSUMER_GROUP_PROTOCOL: "consumer" })
        assert.strictEqual(problems[0]?.variable, "KAFKA_CONSUMER_GROUP_PROTOCOL")
        assert.include(problems[0]?.toString() ?? "", "KAFKA_CLIENT=platformatic")
      })
    )

    it.effect("queue capacity below batch size", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_PRODUCER_BATCH_SIZE: "100", KAFKA_PRODUCER_QUEUE_CAPACITY: "10" })
        assert.strictEqual(problems[0]?.variable, "KAFKA_PRODUCER_QUEUE_CAPACITY")
      })
    )

    it.effect("reconnect backoff above its maximum", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_RECONNECT_BACKOFF_MS: "1000", KAFKA_RECONNECT_BACKOFF_MAX_MS: "10" })
        assert.strictEqual(problems[0]?.variable, "KAFKA_RECONNECT_BACKOFF_MAX_MS")
      })
    )

    it.effect("a DLQ topic that is the consumer topic", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_DLQ_TOPIC: "events" })
        assert.strictEqual(problems[0]?.variable, "KAFKA_DLQ_TOPIC")
      })
    )

    it.effect("a retry topic that is the consumer or DLQ topic", () =>
      Effect.gen(function* () {
        const problems = yield* problemsOf({ KAFKA_RETRY_TOPIC_PREFIX: "events", KAFKA_DLQ_TOPIC: "events-2" })
        assert.deepStrictEqual(
          problems.map((problem) => problem.variable),
          ["KAFKA_RETRY_TOPIC_PREFIX"]
        )
        assert.include(problems[0]?.expected, "neither KAFKA_CONSUMER_TOPIC nor KAFKA_DLQ_TOPIC")
      })
    )

    it.effect("SASL credentials without a mechanism, and a mechanism without credentials", () =>
      Effect.gen(function* () {
        const noMechanism = yield* problemsOf({ KAFKA_SASL_USERNAME: "alice", KAFKA_SASL_PASSWORD: "secret" })
        assert.deepStrictEqual(
          noMechanism.map((problem) => problem.variable),
          ["KAFKA_SASL_MECHANISM"]
        )
        const noCredentials = yield* problemsOf({ KAFKA_SASL_MECHANISM: "plain" })
        assert.deepStrictEqual(
          noCredentials.map((problem) => problem.variable),
          ["KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"]
        )
      })
    )

    it.effect("a TLS client certificate without its key, and TLS files with KAFKA_TLS=false", () =>
      Effect.gen(function* () {
        const noKey = yield* problemsOf({ KAFKA_TLS_CERT_FILE: pem("c.pem") })
        assert.strictEqual(noKey[0]?.variable, "KAFKA_TLS_KEY_FILE")
        const off = yield* problemsOf({ KAFKA_TLS: "false", KAFKA_TLS_CA_FILE: caPem })
        assert.strictEqual(off[0]?.variable, "KAFKA_TLS")
      })
    )
  })

  it.effect("TLS and SASL files that cannot be read are bad variables, found before anything connects", () =>
    Effect.gen(function* () {
      const problems = yield* problemsOf({
        KAFKA_TLS_CA_FILE: "/nonexistent/ca.pem",
        KAFKA_TLS_CERT_FILE: file("not-pem.txt", "hello"),
        KAFKA_TLS_KEY_FILE: files,
        KAFKA_SASL_MECHANISM: "scram-sha-512",
        KAFKA_SASL_USERNAME: "alice",
        KAFKA_SASL_PASSWORD_FILE: "/nonexistent/password"
      })
      assert.deepStrictEqual(
        problems.map((problem) => problem.toString()),
        [
          'KAFKA_SASL_PASSWORD_FILE is "/nonexistent/password"; expected the path of a readable file holding the password',
          'KAFKA_TLS_CA_FILE is "/nonexistent/ca.pem"; expected the path of a readable PEM CA file',
          `KAFKA_TLS_CERT_FILE is "${files}/not-pem.txt"; expected the path of a readable PEM client certificate`,
          `KAFKA_TLS_KEY_FILE is "${files}"; expected the path of a readable PEM client key`
        ]
      )
    })
  )

  it.effect("KAFKA_SASL_PASSWORD_FILE: the password is the file's content without its final line break", () =>
    Effect.gen(function* () {
      const config = yield* load({
        KAFKA_SASL_MECHANISM: "scram-sha-512",
        KAFKA_SASL_USERNAME: "alice",
        KAFKA_SASL_PASSWORD_FILE: file("password", "s3cret with spaces \n")
      })
      const sasl = Option.getOrThrow(config.connection.sasl)
      assert.strictEqual(Redacted.value(sasl.password), "s3cret with spaces ")
      const both = yield* problemsOf({
        KAFKA_SASL_MECHANISM: "plain",
        KAFKA_SASL_USERNAME: "alice",
        KAFKA_SASL_PASSWORD: "x",
        KAFKA_SASL_PASSWORD_FILE: file("password2", "y")
      })
      assert.deepStrictEqual(
        both.map((problem) => problem.variable),
        ["KAFKA_SASL_PASSWORD_FILE"]
      )
    })
  )

  it.effect("a secret never appears in an error", () =>
    Effect.gen(function* () {
      const error = yield* Effect.flip(
        load({ KAFKA_SASL_MECHANISM: "kerberos", KAFKA_SASL_USERNAME: "alice", KAFKA_SASL_PASSWORD: "hunter2-s3cret" })
      )
      assert.notInclude(error.message, "hunter2-s3cret")
      assert.notInclude(JSON.stringify(error), "hunter2-s3cret")
      const config = yield* load({
        KAFKA_SASL_MECHANISM: "plain",
        KAFKA_SASL_USERNAME: "alice",
        KAFKA_SASL_PASSWORD: "hunter2-s3cret"
      })
      assert.notInclude(String(Option.getOrThrow(config.connection.sasl).password), "hunter2-s3cret")
      assert.notInclude(JSON.stringify(config), "hunter2-s3cret")
    })
  )
})
