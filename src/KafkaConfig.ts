/**
 * KafkaConfig: every environment variable of kafka-effect, with the Go example's defaults, validated at start-up.
 *
 * Values are read through Effect's current `ConfigProvider` (the environment by default; tests provide
 * `ConfigProvider.fromUnknown`). A bad value never waits for the first send: loading fails with a
 * `KafkaConfigError` that lists every problem — the variable, the value it had (secrets never shown) and the
 * form it accepts — and inconsistent combinations, such as an idempotent producer with acks other than all.
 *
 * @example
 * ```ts
 * import { Effect } from "effect"
 * import * as KafkaConfig from "kafka-effect/Config"
 *
 * const program = Effect.gen(function* () {
 *   const producer = yield* KafkaConfig.producer
 *   yield* Effect.log(`producing to ${producer.topic} with acks=${producer.acks}`)
 * })
 * ```
 */
import * as Fs from "node:fs"
import { Config, Duration, Effect, Option, Redacted, Schema } from "effect"
import type * as LogLevel from "effect/LogLevel"

/** One bad variable (or combination): what it is, what it held, what it accepts. */
export class ConfigProblem extends Schema.Class<ConfigProblem>("kafka-effect/ConfigProblem")({
  variable: Schema.String,
  /** the raw value, or "(secret)" for secrets, or undefined when the variable was unset */
  value: Schema.UndefinedOr(Schema.String),
  expected: Schema.String,
  /** the default in force, for an unset variable that conflicts with another one */
  defaultValue: Schema.optional(Schema.String)
}) {
  override toString() {
    const got =
      this.value !== undefined
        ? `is ${JSON.stringify(this.value)}`
        : this.defaultValue !== undefined
          ? `is not set, so ${this.defaultValue} (its default)`
          : "is not set"
    return `${this.variable} ${got}; expected ${this.expected}`
  }
}

export class KafkaConfigError extends Schema.TaggedError<KafkaConfigError>()("KafkaConfigError", {
  problems: Schema.Array(ConfigProblem)
}) {
  override get message() {
    return `Invalid Kafka configuration:\n${this.problems.map((problem) => `  - ${problem.toString()}`).join("\n")}`
  }
}

export type Acks = -1 | 0 | 1

/** How the producer compresses its record batches (`KAFKA_PRODUCER_COMPRESSION`); consumers read every one. */
export type Compression = "none" | "gzip" | "snappy" | "lz4" | "zstd"

export type SaslMechanism = "plain" | "scram-sha-256" | "scram-sha-512"

export interface SaslConfig {
  readonly mechanism: SaslMechanism
  readonly username: string
  readonly password: Redacted.Redacted<string>
}

export interface TlsConfig {
  /** PEM file of the CA that signed the brokers' certificates; the system CAs when absent. */
  readonly caFile: Option.Option<string>
  /** PEM client certificate and key files, for brokers that require client authentication. */
  readonly certFile: Option.Option<string>
  readonly keyFile: Option.Option<string>
}

/** The engine behind the `KafkaClient` port (`KAFKA_CLIENT`). */
export type Engine = "kafkajs" | "platformatic"

export interface ConnectionConfig {
  /** which client library talks to Kafka; loaded only when chosen */
  readonly engine: Engine
  readonly brokers: ReadonlyArray<string>
  readonly clientId: string
  readonly sasl: Option.Option<SaslConfig>
  readonly tls: Option.Option<TlsConfig>
  readonly connectionTimeout: Duration.Duration
  readonly requestTimeout: Duration.Duration
  /** First delay of the reconnect schedule; it doubles, with jitter, up to `reconnectBackoffMax`. */
  readonly reconnectBackoff: Duration.Duration
  readonly reconnectBackoffMax: Duration.Duration
}

export interface ProducerConfig {
  readonly topic: string
  readonly acks: Acks
  /** how many times a send that failed with a retriable error is tried again */
  readonly retries: number
  readonly idempotent: boolean
  /** how long a lone record may wait for others to share its request */
  readonly linger: Duration.Duration
  /** most records in one request */
  readonly batchSize: number
  /** most records waiting to be sent; `send` waits when the queue is full */
  readonly queueCapacity: number
  /** how long closing waits for pending records; those still unacknowledged then fail with ProducerClosed */
  readonly flushTimeout: Duration.Duration
  /** the codec of the record batches it writes */
  readonly compression: Compression
}

export interface ConsumerConfig {
  readonly topic: string
  readonly groupId: string
  readonly workers: number
  readonly retryMax: number
  readonly fetchMinBytes: number
  readonly fetchMaxBytes: number
  /** how long the broker may hold a fetch to gather fetchMinBytes */
  readonly fetchMaxWait: Duration.Duration
  readonly retryTopicPrefix: string
  /** the delay of each retry topic, the first for `-1`; the last stands for any further ones */
  readonly retryDelays: ReadonlyArray<Duration.Duration>
  readonly dlqTopic: string
  /** whether missing main, retry and DLQ topics are created at start-up (else start-up fails naming them) */
  readonly createTopics: boolean
  /** partitions of a main topic created at start-up (retry and DLQ topics get the main topic's count) */
  readonly topicPartitions: number
  /** most records queued or being handled; fetching waits beyond it */
  readonly maxInFlight: number
  readonly commitInterval: Duration.Duration
  /** how long shutdown waits for in-flight handlers before it commits what finished */
  readonly shutdownTimeout: Duration.Duration
  /** where a partition without a committed offset starts: its first record (true) or its end */
  readonly fromBeginning: boolean
  readonly sessionTimeout: Duration.Duration
  readonly heartbeatInterval: Duration.Duration
  /** the consumer group protocol: classic, or KIP-848's `consumer` (the platformatic engine only) */
  readonly groupProtocol: GroupProtocol
}

/** The consumer group protocol (`KAFKA_CONSUMER_GROUP_PROTOCOL`). */
export type GroupProtocol = "classic" | "consumer"

// ---------------------------------------------------------------------------------------------------------------
// Reading and validating
// ---------------------------------------------------------------------------------------------------------------

type Parse<A> = (raw: string) => Option.Option<A>

/** Collects the problems of one section while it reads its variables, so that all of them are reported at once. */
class Reader {
  readonly problems: Array<ConfigProblem> = []
  readonly env: ReadonlyMap<string, string>
  constructor(env: ReadonlyMap<string, string>) {
    this.env = env
  }

  /** The value as set, trimmed unless `trim` is false (secrets are taken as they are); empty counts as unset. */
  raw(variable: string, trim = true): string | undefined {
    const value = trim ? this.env.get(variable)?.trim() : this.env.get(variable)
    return value === "" ? undefined : value
  }

  /** The variable parsed, or its default when unset; a bad value is recorded and the default stands in. */
  field<A>(variable: string, fallback: A, parse: Parse<A>, expected: string, options?: { readonly secret?: boolean }) {
    const raw = this.raw(variable)
    if (raw === undefined) return fallback
    const parsed = parse(raw)
    if (Option.isSome(parsed)) return parsed.value
    this.problem(variable, options?.secret ? "(secret)" : raw, expected)
    return fallback
  }

  optional<A>(variable: string, parse: Parse<A>, expected: string, options?: { readonly secret?: boolean }) {
    const raw = this.raw(variable, options?.secret !== true)
    if (raw === undefined) return Option.none<A>()
    const parsed = parse(raw)
    if (Option.isNone(parsed)) this.problem(variable, options?.secret ? "(secret)" : raw, expected)
    return parsed
  }

  problem(variable: string, value: string | undefined, expected: string) {
    this.problems.push(new ConfigProblem({ variable, value, expected }))
  }

  /** A combination problem: `variable`, as set or else at its default `effective`, conflicts with another. */
  conflict(variable: string, effective: unknown, expected: string) {
    const value = this.raw(variable)
    this.problems.push(
      value === undefined
        ? new ConfigProblem({ variable, value, expected, defaultValue: String(effective) })
        : new ConfigProblem({ variable, value, expected })
    )
  }

  done<A>(value: A): Effect.Effect<A, KafkaConfigError> {
    return this.problems.length === 0
      ? Effect.succeed(value)
      : Effect.fail(new KafkaConfigError({ problems: this.problems }))
  }
}

const text: Parse<string> = Option.some

const integer =
  (min: number, max = Number.MAX_SAFE_INTEGER): Parse<number> =>
  (raw) => {
    if (!/^-?\d+$/.test(raw)) return Option.none()
    const n = Number(raw)
    return n >= min && n <= max ? Option.some(n) : Option.none()
  }

const boolean: Parse<boolean> = (raw) => {
  const value = raw.toLowerCase()
  if (["true", "1", "yes", "on"].includes(value)) return Option.some(true)
  if (["false", "0", "no", "off"].includes(value)) return Option.some(false)
  return Option.none()
}
const booleanForm = "true or false (also 1/0, yes/no, on/off)"

const millis =
  (min: number, max = Number.MAX_SAFE_INTEGER): Parse<Duration.Duration> =>
  (raw) =>
    Option.map(integer(min, max)(raw), Duration.millis)

/** A file's text, read now: one that cannot be read stops start-up as a bad variable, before anything connects. */
const readFile = (path: string): Option.Option<string> => {
  try {
    return Option.some(Fs.readFileSync(path, "utf8"))
  } catch {
    return Option.none()
  }
}

/** The path of a file that can be read and holds PEM (a `-----BEGIN` line). */
const pemFile: Parse<string> = (raw) =>
  Option.flatMap(readFile(raw), (content) => (content.includes("-----BEGIN ") ? Option.some(raw) : Option.none()))

const oneOf =
  <A>(choices: Readonly<Record<string, A>>): Parse<A> =>
  (raw) => {
    const key = raw.toLowerCase()
    return Object.hasOwn(choices, key) ? Option.some(choices[key] as A) : Option.none()
  }

// No bracketed IPv6 literals: kafkajs splits a broker address at every colon, so [::1]:9092 would become host "["
// and port 0, and start-up would wait for ever for a broker it cannot reach.
const hostPort = /^([A-Za-z0-9._-]+):(\d{1,5})$/

const brokerList: Parse<ReadonlyArray<string>> = (raw) => {
  const brokers = raw.split(",").map((broker) => broker.trim())
  const valid = brokers.every((broker) => {
    const match = hostPort.exec(broker)
    const port = Number(match?.[2])
    return match !== null && port >= 1 && port <= 65535
  })
  return valid ? Option.some(brokers) : Option.none()
}

const delayList: Parse<ReadonlyArray<Duration.Duration>> = (raw) => {
  const parts = raw.split(",").map((part) => part.trim())
  const delays = parts.map((part) =>
    /^\d{1,9}$/.test(part) && Number(part) <= 604_800_000 ? Number(part) : Number.NaN
  )
  return parts.length > 0 && delays.every(Number.isFinite) ? Option.some(delays.map(Duration.millis)) : Option.none()
}

/** Kafka's legal topic names: 1–249 of [a-zA-Z0-9._-], and not "." or "..". */
const topicName: Parse<string> = (raw) =>
  /^[a-zA-Z0-9._-]{1,249}$/.test(raw) && raw !== "." && raw !== ".." ? Option.some(raw) : Option.none()
const topicForm = "a Kafka topic name: 1 to 249 characters of a-z A-Z 0-9 . _ -"

/** The names of every variable, for reading them in one pass. */
export const variables = [
  "KAFKA_CLIENT",
  "KAFKA_BROKERS",
  "KAFKA_CLIENT_ID",
  "KAFKA_SASL_MECHANISM",
  "KAFKA_SASL_USERNAME",
  "KAFKA_SASL_PASSWORD",
  "KAFKA_SASL_PASSWORD_FILE",
  "KAFKA_TLS",
  "KAFKA_TLS_CA_FILE",
  "KAFKA_TLS_CERT_FILE",
  "KAFKA_TLS_KEY_FILE",
  "KAFKA_CONNECTION_TIMEOUT_MS",
  "KAFKA_REQUEST_TIMEOUT_MS",
  "KAFKA_RECONNECT_BACKOFF_MS",
  "KAFKA_RECONNECT_BACKOFF_MAX_MS",
  "KAFKA_PRODUCER_TOPIC",
  "KAFKA_PRODUCER_ACKS",
  "KAFKA_PRODUCER_RETRIES",
  "KAFKA_PRODUCER_IDEMPOTENT",
  "KAFKA_PRODUCER_LINGER_MS",
  "KAFKA_PRODUCER_BATCH_SIZE",
  "KAFKA_PRODUCER_QUEUE_CAPACITY",
  "KAFKA_PRODUCER_FLUSH_TIMEOUT_MS",
  "KAFKA_PRODUCER_COMPRESSION",
  "KAFKA_CONSUMER_TOPIC",
  "KAFKA_CONSUMER_GROUP_ID",
  "KAFKA_CONSUMER_WORKERS",
  "KAFKA_CONSUMER_RETRY_MAX",
  "KAFKA_CONSUMER_FETCH_MIN_BYTES",
  "KAFKA_CONSUMER_FETCH_MAX_BYTES",
  "KAFKA_CONSUMER_FETCH_MAX_WAIT_MS",
  "KAFKA_RETRY_TOPIC_PREFIX",
  "KAFKA_DLQ_TOPIC",
  "KAFKA_RETRY_DELAYS_MS",
  "KAFKA_CREATE_TOPICS",
  "KAFKA_TOPIC_PARTITIONS",
  "KAFKA_CONSUMER_MAX_IN_FLIGHT",
  "KAFKA_CONSUMER_COMMIT_INTERVAL_MS",
  "KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS",
  "KAFKA_CONSUMER_FROM_BEGINNING",
  "KAFKA_CONSUMER_SESSION_TIMEOUT_MS",
  "KAFKA_CONSUMER_GROUP_PROTOCOL",
  "KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS",
  "LOG_LEVEL",
  "LOG_FORMAT",
  "METRICS_PORT",
  "METRICS_HOST",
  "OTEL_EXPORTER_OTLP_ENDPOINT",
  "OTEL_SERVICE_NAME"
] as const

const readEnv: Effect.Effect<Reader, KafkaConfigError> = Effect.gen(function* () {
  const env = new Map<string, string>()
  for (const variable of variables) {
    const value = yield* Config.option(Config.String(variable)).pipe(
      Effect.mapError(
        (error) =>
          new KafkaConfigError({
            problems: [
              new ConfigProblem({ variable, value: undefined, expected: `a readable value (${error.message})` })
            ]
          })
      )
    )
    if (Option.isSome(value)) env.set(variable, value.value)
  }
  return new Reader(env)
})

const readConnection = (r: Reader): ConnectionConfig => {
  const engine = r.field(
    "KAFKA_CLIENT",
    "kafkajs",
    oneOf<Engine>({ kafkajs: "kafkajs", platformatic: "platformatic" }),
    "kafkajs or platformatic"
  )
  const brokers = r.field(
    "KAFKA_BROKERS",
    ["localhost:9092"],
    brokerList,
    "a comma-separated list of host:port with ports 1-65535, e.g. kafka-1:9092,kafka-2:9092 (a host name or IPv4 address: kafkajs cannot take IPv6 literals, give the host a name)"
  )
  const clientId = r.field("KAFKA_CLIENT_ID", "kafka-effect", text, "a client id")

  const mechanism = r.optional(
    "KAFKA_SASL_MECHANISM",
    oneOf<SaslMechanism>({ plain: "plain", "scram-sha-256": "scram-sha-256", "scram-sha-512": "scram-sha-512" }),
    "one of plain, scram-sha-256, scram-sha-512"
  )
  const username = r.optional("KAFKA_SASL_USERNAME", text, "a user name")
  const passwordSet = r.optional("KAFKA_SASL_PASSWORD", (raw) => Option.some(Redacted.make(raw)), "a password", {
    secret: true
  })
  // A mounted secret (Kubernetes, Docker): the file's content, without its final line break.
  const passwordFile = r.optional(
    "KAFKA_SASL_PASSWORD_FILE",
    (raw) =>
      Option.flatMap(readFile(raw), (content) => {
        const secret = content.replace(/\r?\n$/, "")
        return secret === "" ? Option.none() : Option.some(Redacted.make(secret))
      }),
    "the path of a readable file holding the password"
  )
  if (Option.isSome(passwordSet) && r.raw("KAFKA_SASL_PASSWORD_FILE") !== undefined) {
    r.problem("KAFKA_SASL_PASSWORD_FILE", r.raw("KAFKA_SASL_PASSWORD_FILE"), "unset when KAFKA_SASL_PASSWORD is set")
  }
  const password = Option.orElse(passwordSet, () => passwordFile)
  let sasl = Option.none<SaslConfig>()
  if (Option.isSome(mechanism)) {
    if (Option.isNone(username))
      r.problem("KAFKA_SASL_USERNAME", undefined, `a user name when KAFKA_SASL_MECHANISM is set`)
    if (Option.isNone(password) && r.raw("KAFKA_SASL_PASSWORD_FILE") === undefined)
      r.problem(
        "KAFKA_SASL_PASSWORD",
        undefined,
        `a password (or KAFKA_SASL_PASSWORD_FILE) when KAFKA_SASL_MECHANISM is set`
      )
    if (Option.isSome(username) && Option.isSome(password)) {
      sasl = Option.some({ mechanism: mechanism.value, username: username.value, password: password.value })
    }
  } else if (r.raw("KAFKA_SASL_MECHANISM") === undefined && (Option.isSome(username) || Option.isSome(password))) {
    r.problem(
      "KAFKA_SASL_MECHANISM",
      undefined,
      "one of plain, scram-sha-256, scram-sha-512 when KAFKA_SASL_USERNAME or KAFKA_SASL_PASSWORD is set"
    )
  }

  const caFile = r.optional("KAFKA_TLS_CA_FILE", pemFile, "the path of a readable PEM CA file")
  const certFile = r.optional("KAFKA_TLS_CERT_FILE", pemFile, "the path of a readable PEM client certificate")
  const keyFile = r.optional("KAFKA_TLS_KEY_FILE", pemFile, "the path of a readable PEM client key")
  if (Option.isSome(certFile) !== Option.isSome(keyFile)) {
    const missing = Option.isSome(certFile) ? "KAFKA_TLS_KEY_FILE" : "KAFKA_TLS_CERT_FILE"
    r.problem(missing, undefined, "both KAFKA_TLS_CERT_FILE and KAFKA_TLS_KEY_FILE, or neither")
  }
  const anyTlsFile = Option.isSome(caFile) || Option.isSome(certFile) || Option.isSome(keyFile)
  const tlsOn = r.field("KAFKA_TLS", anyTlsFile, boolean, booleanForm)
  if (!tlsOn && anyTlsFile) {
    r.problem("KAFKA_TLS", r.raw("KAFKA_TLS"), "true (or unset) when a KAFKA_TLS_*_FILE is set")
  }
  const tls = tlsOn ? Option.some({ caFile, certFile, keyFile }) : Option.none<TlsConfig>()

  const msForm = (min: number) => `a whole number of milliseconds, at least ${min}`
  const connectionTimeout = r.field("KAFKA_CONNECTION_TIMEOUT_MS", Duration.seconds(10), millis(100), msForm(100))
  const requestTimeout = r.field("KAFKA_REQUEST_TIMEOUT_MS", Duration.seconds(30), millis(100), msForm(100))
  const reconnectBackoff = r.field("KAFKA_RECONNECT_BACKOFF_MS", Duration.millis(200), millis(1), msForm(1))
  const reconnectBackoffMax = r.field("KAFKA_RECONNECT_BACKOFF_MAX_MS", Duration.seconds(30), millis(1), msForm(1))
  if (Duration.isGreaterThan(reconnectBackoff, reconnectBackoffMax)) {
    r.conflict(
      "KAFKA_RECONNECT_BACKOFF_MAX_MS",
      Duration.toMillis(reconnectBackoffMax),
      `at least KAFKA_RECONNECT_BACKOFF_MS (${Duration.toMillis(reconnectBackoff)})`
    )
  }
  return {
    engine,
    brokers,
    clientId,
    sasl,
    tls,
    connectionTimeout,
    requestTimeout,
    reconnectBackoff,
    reconnectBackoffMax
  }
}

const readProducer = (r: Reader): ProducerConfig => {
  const topic = r.field("KAFKA_PRODUCER_TOPIC", "events", topicName, topicForm)
  const acks = r.field<Acks>(
    "KAFKA_PRODUCER_ACKS",
    -1,
    oneOf<Acks>({ all: -1, "-1": -1, "1": 1, leader: 1, "0": 0, none: 0 }),
    "all (or -1), 1 (or leader), 0 (or none)"
  )
  const retries = r.field("KAFKA_PRODUCER_RETRIES", 3, integer(0, 1000), "a whole number from 0 to 1000")
  const idempotent = r.field("KAFKA_PRODUCER_IDEMPOTENT", true, boolean, booleanForm)
  if (idempotent && acks !== -1) {
    r.conflict(
      "KAFKA_PRODUCER_ACKS",
      acks,
      `all when KAFKA_PRODUCER_IDEMPOTENT is true${r.raw("KAFKA_PRODUCER_IDEMPOTENT") === undefined ? " (its default; set it to false for other acks)" : ""} (an idempotent producer needs every in-sync replica's ack)`
    )
  }
  if (idempotent && retries === 0) {
    r.conflict(
      "KAFKA_PRODUCER_RETRIES",
      retries,
      `at least 1 when KAFKA_PRODUCER_IDEMPOTENT is true${r.raw("KAFKA_PRODUCER_IDEMPOTENT") === undefined ? " (its default)" : ""} (idempotence exists to make retries safe)`
    )
  }
  const linger = r.field("KAFKA_PRODUCER_LINGER_MS", Duration.millis(5), millis(0, 60_000), "0 to 60000 milliseconds")
  const batchSize = r.field("KAFKA_PRODUCER_BATCH_SIZE", 500, integer(1, 100_000), "a whole number from 1 to 100000")
  const queueCapacity = r.field(
    "KAFKA_PRODUCER_QUEUE_CAPACITY",
    10_000,
    integer(1, 10_000_000),
    "a whole number from 1 to 10000000"
  )
  if (queueCapacity < batchSize) {
    r.conflict("KAFKA_PRODUCER_QUEUE_CAPACITY", queueCapacity, `at least KAFKA_PRODUCER_BATCH_SIZE (${batchSize})`)
  }
  const flushTimeout = r.field(
    "KAFKA_PRODUCER_FLUSH_TIMEOUT_MS",
    Duration.seconds(30),
    millis(100, 600_000),
    "a whole number of milliseconds from 100 to 600000"
  )
  const compression = r.field<Compression>(
    "KAFKA_PRODUCER_COMPRESSION",
    "none",
    oneOf<Compression>({ none: "none", gzip: "gzip", snappy: "snappy", lz4: "lz4", zstd: "zstd" }),
    "none, gzip, snappy, lz4 or zstd"
  )
  return { topic, acks, retries, idempotent, linger, batchSize, queueCapacity, flushTimeout, compression }
}

const readConsumer = (r: Reader): ConsumerConfig => {
  const topic = r.field("KAFKA_CONSUMER_TOPIC", "events", topicName, topicForm)
  const groupId = r.field("KAFKA_CONSUMER_GROUP_ID", "event-processor-group", text, "a consumer group id")
  const workers = r.field("KAFKA_CONSUMER_WORKERS", 5, integer(1, 1024), "a whole number from 1 to 1024")
  const retryMax = r.field("KAFKA_CONSUMER_RETRY_MAX", 3, integer(0, 100), "a whole number from 0 to 100")
  const fetchMinBytes = r.field(
    "KAFKA_CONSUMER_FETCH_MIN_BYTES",
    1024,
    integer(1, 2 ** 31 - 1),
    "a whole number of bytes from 1 to 2147483647"
  )
  const fetchMaxBytes = r.field(
    "KAFKA_CONSUMER_FETCH_MAX_BYTES",
    10_485_760,
    integer(1, 2 ** 31 - 1),
    "a whole number of bytes from 1 to 2147483647"
  )
  const fetchMaxWait = r.field(
    "KAFKA_CONSUMER_FETCH_MAX_WAIT_MS",
    Duration.millis(500),
    millis(0, 60_000),
    "a whole number of milliseconds from 0 to 60000"
  )
  if (fetchMinBytes > fetchMaxBytes) {
    r.conflict(
      "KAFKA_CONSUMER_FETCH_MIN_BYTES",
      fetchMinBytes,
      `at most KAFKA_CONSUMER_FETCH_MAX_BYTES (${fetchMaxBytes})`
    )
  }
  // Retry topics are `${prefix}-${n}`: the prefix must leave room for the suffix within Kafka's 249 characters.
  const retryTopicPrefix = r.field(
    "KAFKA_RETRY_TOPIC_PREFIX",
    "events-retry",
    (raw) => topicName(`${raw}-${retryMax}`).pipe(Option.as(raw)),
    "a topic name prefix: characters a-z A-Z 0-9 . _ - and short enough for the suffix -N"
  )
  const dlqTopic = r.field("KAFKA_DLQ_TOPIC", "events-dlq", topicName, topicForm)
  if (dlqTopic === topic) {
    r.conflict("KAFKA_DLQ_TOPIC", dlqTopic, "a topic other than KAFKA_CONSUMER_TOPIC")
  }
  const retryTopics = Array.from({ length: retryMax }, (_, i) => `${retryTopicPrefix}-${i + 1}`)
  if (retryTopics.includes(topic) || retryTopics.includes(dlqTopic)) {
    r.conflict(
      "KAFKA_RETRY_TOPIC_PREFIX",
      retryTopicPrefix,
      "a prefix whose retry topics (prefix-1 … prefix-N) are neither KAFKA_CONSUMER_TOPIC nor KAFKA_DLQ_TOPIC"
    )
  }
  const retryDelays = r.field(
    "KAFKA_RETRY_DELAYS_MS",
    [Duration.seconds(5), Duration.seconds(30), Duration.minutes(3)],
    delayList,
    "comma-separated whole numbers of milliseconds from 0 to 604800000, one per retry topic (the last repeats), e.g. 5000,30000,180000"
  )
  const createTopics = r.field("KAFKA_CREATE_TOPICS", false, boolean, booleanForm)
  const topicPartitions = r.field("KAFKA_TOPIC_PARTITIONS", 6, integer(1, 10_000), "a whole number from 1 to 10000")
  const maxInFlight = r.field(
    "KAFKA_CONSUMER_MAX_IN_FLIGHT",
    Math.max(1000, workers * 20),
    integer(1, 10_000_000),
    "a whole number from 1 to 10000000"
  )
  const ms = (min: number, max: number) => `a whole number of milliseconds from ${min} to ${max}`
  const commitInterval = r.field(
    "KAFKA_CONSUMER_COMMIT_INTERVAL_MS",
    Duration.seconds(5),
    millis(10, 3_600_000),
    ms(10, 3_600_000)
  )
  const shutdownTimeout = r.field(
    "KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS",
    Duration.seconds(30),
    millis(0, 3_600_000),
    ms(0, 3_600_000)
  )
  const fromBeginning = r.field("KAFKA_CONSUMER_FROM_BEGINNING", true, boolean, booleanForm)
  const sessionTimeout = r.field(
    "KAFKA_CONSUMER_SESSION_TIMEOUT_MS",
    Duration.seconds(30),
    millis(1_000, 3_600_000),
    ms(1_000, 3_600_000)
  )
  const heartbeatInterval = r.field(
    "KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS",
    Duration.seconds(3),
    millis(10, 3_600_000),
    ms(10, 3_600_000)
  )
  const groupProtocol = r.field(
    "KAFKA_CONSUMER_GROUP_PROTOCOL",
    "classic",
    oneOf<GroupProtocol>({ classic: "classic", consumer: "consumer" }),
    "classic or consumer (KIP-848; with KAFKA_CLIENT=platformatic)"
  )
  if (groupProtocol === "consumer" && r.raw("KAFKA_CLIENT") !== "platformatic") {
    r.conflict(
      "KAFKA_CONSUMER_GROUP_PROTOCOL",
      "consumer",
      "classic unless KAFKA_CLIENT=platformatic (kafkajs has only the classic protocol)"
    )
  }
  if (Duration.isGreaterThanOrEqualTo(heartbeatInterval, sessionTimeout)) {
    r.conflict(
      "KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS",
      Duration.toMillis(heartbeatInterval),
      `less than KAFKA_CONSUMER_SESSION_TIMEOUT_MS (${Duration.toMillis(sessionTimeout)}), a third of it is usual`
    )
  }
  return {
    topic,
    groupId,
    workers,
    retryMax,
    fetchMinBytes,
    fetchMaxBytes,
    fetchMaxWait,
    retryTopicPrefix,
    retryDelays,
    dlqTopic,
    createTopics,
    topicPartitions,
    maxInFlight,
    commitInterval,
    shutdownTimeout,
    fromBeginning,
    sessionTimeout,
    heartbeatInterval,
    groupProtocol
  }
}

const readLogLevel = (r: Reader): LogLevel.LogLevel =>
  r.field<LogLevel.LogLevel>(
    "LOG_LEVEL",
    "Info",
    oneOf<LogLevel.LogLevel>({
      all: "All",
      trace: "Trace",
      debug: "Debug",
      info: "Info",
      warn: "Warn",
      warning: "Warn",
      error: "Error",
      fatal: "Fatal",
      panic: "Fatal",
      none: "None",
      off: "None"
    }),
    "one of trace, debug, info, warn, error, fatal, none"
  )

/** The connection settings: brokers, client id, SASL, TLS, timeouts, reconnect backoff. */
export const connection: Effect.Effect<ConnectionConfig, KafkaConfigError> = Effect.flatMap(readEnv, (r) =>
  r.done(readConnection(r))
)

/** The producer's settings. */
export const producer: Effect.Effect<ProducerConfig, KafkaConfigError> = Effect.flatMap(readEnv, (r) =>
  r.done(readProducer(r))
)

/** The consumer's, retry topics' and DLQ's settings. */
export const consumer: Effect.Effect<ConsumerConfig, KafkaConfigError> = Effect.flatMap(readEnv, (r) =>
  r.done(readConsumer(r))
)

export type LogFormat = "json" | "pretty"

export interface LoggingConfig {
  readonly level: LogLevel.LogLevel
  /** `json` or `pretty`; unset means json when stdout is not a terminal */
  readonly format: Option.Option<LogFormat>
}

const readLogging = (r: Reader): LoggingConfig => ({
  level: readLogLevel(r),
  format: r.optional("LOG_FORMAT", oneOf<LogFormat>({ json: "json", pretty: "pretty" }), "json or pretty")
})

/** `LOG_LEVEL` and `LOG_FORMAT`. */
export const logging: Effect.Effect<LoggingConfig, KafkaConfigError> = Effect.flatMap(readEnv, (r) =>
  r.done(readLogging(r))
)

export interface ObservabilityConfig {
  /** where `/metrics`, `/healthz` and `/readyz` are served; none when METRICS_PORT is unset */
  readonly metricsPort: Option.Option<number>
  /** the address the HTTP server binds to: loopback unless configured otherwise */
  readonly metricsHost: string
  /** the OTLP/HTTP endpoint traces are exported to; none when unset */
  readonly otlpEndpoint: Option.Option<string>
  readonly serviceName: string
}

const readObservability = (r: Reader): ObservabilityConfig => ({
  metricsPort: r.optional("METRICS_PORT", integer(1, 65_535), "a port number from 1 to 65535"),
  metricsHost: r.field("METRICS_HOST", "127.0.0.1", text, "a host name or IP address to bind to"),
  otlpEndpoint: r.optional(
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    (raw) => (/^https?:\/\/[^\s]+$/.test(raw) ? Option.some(raw.replace(/\/+$/, "")) : Option.none()),
    "an http:// or https:// URL, e.g. http://localhost:4318"
  ),
  serviceName: r.field("OTEL_SERVICE_NAME", "kafka-effect", text, "a service name")
})

/** Metrics server and tracing export settings. */
export const observability: Effect.Effect<ObservabilityConfig, KafkaConfigError> = Effect.flatMap(readEnv, (r) =>
  r.done(readObservability(r))
)

export interface KafkaConfig {
  readonly connection: ConnectionConfig
  readonly producer: ProducerConfig
  readonly consumer: ConsumerConfig
  readonly logging: LoggingConfig
  readonly observability: ObservabilityConfig
}

/** Every section at once, with every problem of every section in one error. */
export const all: Effect.Effect<KafkaConfig, KafkaConfigError> = Effect.flatMap(readEnv, (r) =>
  r.done({
    connection: readConnection(r),
    producer: readProducer(r),
    consumer: readConsumer(r),
    logging: readLogging(r),
    observability: readObservability(r)
  })
)
