/**
 * What `--help` says about the environment: every variable with its default and meaning, as the README's
 * configuration table says (a test holds the two together, and both to the variables `KafkaConfig` reads).
 */
export const variables: ReadonlyArray<readonly [name: string, fallback: string, meaning: string]> = [
  ["KAFKA_BROKERS", "localhost:9092", "Bootstrap brokers, host:port[,host:port…]"],
  ["KAFKA_CLIENT_ID", "kafka-effect", "Client id sent to the brokers"],
  ["KAFKA_CLIENT", "kafkajs", "The engine: kafkajs or platformatic (@platformatic/kafka; see Engines)"],
  ["KAFKA_SASL_MECHANISM", "unset (no SASL)", "plain, scram-sha-256 or scram-sha-512"],
  ["KAFKA_SASL_USERNAME", "", "SASL user"],
  ["KAFKA_SASL_PASSWORD", "", "SASL password (never logged)"],
  ["KAFKA_SASL_PASSWORD_FILE", "", "A file holding the password (a mounted secret), instead of the above"],
  ["KAFKA_TLS", "true if a TLS file is set", "Connect with TLS"],
  ["KAFKA_TLS_CA_FILE", "system CAs", "PEM of the CA of the brokers' certificates"],
  ["KAFKA_TLS_CERT_FILE", "", "Client certificate and key (both or neither)"],
  ["KAFKA_TLS_KEY_FILE", "", "Client certificate and key (both or neither)"],
  ["KAFKA_CONNECTION_TIMEOUT_MS", "10000", "Connect timeout"],
  ["KAFKA_REQUEST_TIMEOUT_MS", "30000", "Request timeout"],
  ["KAFKA_RECONNECT_BACKOFF_MS", "200", "First reconnect delay (doubles, jittered)"],
  ["KAFKA_RECONNECT_BACKOFF_MAX_MS", "30000", "Longest reconnect delay"],
  ["KAFKA_PRODUCER_TOPIC", "events", "Default topic of send and the producer program"],
  ["KAFKA_PRODUCER_ACKS", "all", "all, 1 or 0 (all when idempotent)"],
  ["KAFKA_PRODUCER_RETRIES", "3", "Retries of a batch that failed retriably"],
  ["KAFKA_PRODUCER_IDEMPOTENT", "true", "Idempotent producer"],
  ["KAFKA_PRODUCER_LINGER_MS", "5", "How long a batch may wait to fill"],
  ["KAFKA_PRODUCER_BATCH_SIZE", "500", "Most records in one request"],
  ["KAFKA_PRODUCER_QUEUE_CAPACITY", "10000", "Most records waiting; send waits beyond"],
  ["KAFKA_PRODUCER_COMPRESSION", "none", "none, gzip, snappy, lz4 or zstd (every codec is read)"],
  ["KAFKA_PRODUCER_FLUSH_TIMEOUT_MS", "30000", "How long closing waits for pending records"],
  ["KAFKA_CONSUMER_TOPIC", "events", "Topic consumed"],
  ["KAFKA_CONSUMER_GROUP_ID", "event-processor-group", "Consumer group"],
  ["KAFKA_CONSUMER_WORKERS", "5", "Worker fibers (records of one key go to one)"],
  ["KAFKA_CONSUMER_RETRY_MAX", "3", "Retry topics before the dead-letter topic"],
  ["KAFKA_CONSUMER_FETCH_MIN_BYTES", "1024", "Fetch min bytes"],
  ["KAFKA_CONSUMER_FETCH_MAX_BYTES", "10485760", "Fetch max bytes"],
  ["KAFKA_CONSUMER_FETCH_MAX_WAIT_MS", "500", "How long the broker may hold a fetch"],
  ["KAFKA_RETRY_TOPIC_PREFIX", "events-retry", "Retry topics are <prefix>-1 … -N"],
  ["KAFKA_DLQ_TOPIC", "events-dlq", "Dead-letter topic"],
  ["KAFKA_RETRY_DELAYS_MS", "5000,30000,180000", "Delay of each retry topic"],
  ["KAFKA_CREATE_TOPICS", "false", "Create missing main, retry and dead-letter topics at start"],
  ["KAFKA_TOPIC_PARTITIONS", "6", "Partitions of a main topic created"],
  [
    "KAFKA_CONSUMER_MAX_IN_FLIGHT",
    "max(1000, 20 × workers)",
    "Records delivered and not yet committed; fetching waits beyond"
  ],
  ["KAFKA_CONSUMER_COMMIT_INTERVAL_MS", "5000", "How often progress is committed while a batch runs"],
  ["KAFKA_CONSUMER_SHUTDOWN_TIMEOUT_MS", "30000", "How long shutdown waits for handlers in flight"],
  ["KAFKA_CONSUMER_FROM_BEGINNING", "true", "A new group starts at the earliest record"],
  ["KAFKA_CONSUMER_SESSION_TIMEOUT_MS", "30000", "Group session timeout (also the readiness bound)"],
  ["KAFKA_CONSUMER_GROUP_PROTOCOL", "classic", "classic, or consumer (KIP-848; needs KAFKA_CLIENT=platformatic)"],
  ["KAFKA_CONSUMER_HEARTBEAT_INTERVAL_MS", "3000", "Heartbeat interval"],
  ["LOG_LEVEL", "info", "trace … fatal, none"],
  ["LOG_FORMAT", "json unless a terminal", "json or pretty (logs go to stderr)"],
  ["METRICS_PORT", "unset", "Port of /metrics, /healthz, /readyz"],
  ["METRICS_HOST", "127.0.0.1", "Address the endpoint binds to"],
  ["OTEL_EXPORTER_OTLP_ENDPOINT", "unset", "OTLP/HTTP endpoint for traces, logs and metrics"],
  ["OTEL_SERVICE_NAME", "kafka-effect", "Service name of the exported telemetry"]
]

/** The variables as `--help` prints them, one a line. */
export const environment = (): string => {
  const width = Math.max(...variables.map(([name]) => name.length))
  return variables
    .map(
      ([name, fallback, meaning]) =>
        `  ${name.padEnd(width)}  ${meaning}${fallback === "" ? "" : ` (default ${fallback})`}`
    )
    .join("\n")
}
