/**
 * Metrics, probes and logs of the consumer program against a real broker, scraped over HTTP as Prometheus would.
 * The program runs as its own OS process, from src/ with type stripping.
 */
import * as Net from "node:net"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { inject } from "vitest"
import * as Program from "../scripts/program.ts"
import * as KafkaProducer from "../src/KafkaProducer.ts"
import { eventually, freePort, get } from "./support/http.ts"
import { clientLayer, createTopic, uniqueName } from "./support/kafka.ts"

const brokers = inject("kafkaBrokers")

/** A TCP proxy from `port` to the broker: the program can reach the broker only once it runs. */
const proxy = (port: number) =>
  Effect.acquireRelease(
    Effect.promise(
      () =>
        new Promise<{ server: Net.Server; sockets: Set<Net.Socket> }>((resolve) => {
          const [host, brokerPort] = (brokers.split(",")[0] ?? "").split(":")
          const sockets = new Set<Net.Socket>()
          const server = Net.createServer((socket) => {
            const upstream = Net.connect(Number(brokerPort), host ?? "127.0.0.1")
            sockets.add(socket).add(upstream)
            socket.pipe(upstream).pipe(socket)
            socket.on("error", () => upstream.destroy())
            upstream.on("error", () => socket.destroy())
          })
          server.on("close", () => {
            for (const socket of sockets) socket.destroy()
          })
          server.listen(port, "127.0.0.1", () => resolve({ server, sockets }))
        })
    ),
    ({ server, sockets }) =>
      Effect.promise(
        () =>
          new Promise<void>((resolve) => {
            server.close(() => resolve())
            for (const socket of sockets) socket.destroy()
          })
      )
  )

/** The value of one Prometheus sample line, e.g. `kafka_effect_records_processed_total{…}`, or undefined. */
const sample = (text: string, name: string, labels: Record<string, string>) => {
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue
    const matches = Object.entries(labels).every(([key, value]) => line.includes(`${key}="${value}"`))
    if (matches) return Number(line.slice(line.lastIndexOf(" ") + 1))
  }
  return undefined
}

const startConsumer = (env: Record<string, string>, args: ReadonlyArray<string> = []) =>
  Program.start(Program.consumerProgram, { args, env: { LOG_FORMAT: "json", ...env } })

const event = (id: string) =>
  JSON.stringify({
    id,
    type: "order.created",
    source: "test",
    timestamp: "2026-11-28T10:00:00Z",
    subject: id,
    payload: {}
  })

describe("Observability on a real broker", () => {
  it.live(
    "/readyz is 503 before the group is joined and 200 after; /metrics counts what happened; lag falls to 0",
    () =>
      Effect.gen(function* () {
        const topic = uniqueName("observed")
        yield* createTopic(brokers, topic, 3)
        const [proxyPort, metricsPort] = [yield* freePort, yield* freePort]
        const base = `http://127.0.0.1:${metricsPort}`
        const group = uniqueName("observed-group")
        const consumer = startConsumer(
          {
            KAFKA_BROKERS: `127.0.0.1:${proxyPort}`,
            KAFKA_CONSUMER_TOPIC: topic,
            KAFKA_CONSUMER_GROUP_ID: group,
            KAFKA_RETRY_TOPIC_PREFIX: `${topic}-retry`,
            KAFKA_CONSUMER_RETRY_MAX: "1",
            KAFKA_RETRY_DELAYS_MS: "500",
            KAFKA_DLQ_TOPIC: `${topic}-dlq`,
            KAFKA_CREATE_TOPICS: "true",
            KAFKA_RECONNECT_BACKOFF_MS: "100",
            KAFKA_RECONNECT_BACKOFF_MAX_MS: "500",
            KAFKA_CONSUMER_COMMIT_INTERVAL_MS: "200",
            METRICS_PORT: String(metricsPort),
            LOG_LEVEL: "info"
          },
          // Every event fails on the main topic and succeeds on the retry topic.
          ["--transient-failures", "1"]
        )
        yield* Effect.addFinalizer(() => Effect.sync(() => consumer.child.kill("SIGKILL")))

        // The broker is out of reach: the endpoint answers, and the program is not ready.
        const before = yield* eventually(get(`${base}/readyz`), () => true, "the HTTP endpoint")
        assert.strictEqual(before.status, 503, before.body)
        assert.strictEqual((yield* get(`${base}/healthz`)).status, 200)
        yield* proxy(proxyPort)
        const after = yield* eventually(get(`${base}/readyz`), (r) => r.status === 200, "readiness")
        assert.deepStrictEqual(JSON.parse(after.body).services, {
          producer: true,
          [`consumer ${group}`]: true,
          [`consumer ${group}-retry-1`]: true,
          [`retry and dead-letter sends of ${group}`]: true
        })

        // 40 events that fail once (sent to the retry topic, then done) and 4 invalid records (dead-lettered).
        const ids = Array.from({ length: 40 }, (_, i) => `e-${i}`)
        yield* Effect.gen(function* () {
          const producer = yield* KafkaProducer.KafkaProducer
          yield* producer.sendAll([
            ...ids.map((id) => ({ topic, key: id, value: event(id) })),
            ...[1, 2, 3, 4].map((n) => ({ topic, key: `bad-${n}`, value: `{"broken": ${n}` }))
          ])
        }).pipe(Effect.provide(KafkaProducer.layer({ topic }).pipe(Layer.provideMerge(clientLayer(brokers)))))

        const processed = (outcome: string) => (text: string) =>
          sample(text, "kafka_effect_records_processed_total", { topic, outcome })
        const metrics = yield* eventually(
          Effect.map(get(`${base}/metrics`), (r) => r.body),
          (text) => processed("done")(text) === 40 && processed("dead_lettered")(text) === 4,
          "the counters"
        )
        // Give the lag gauges the last batch ends, then read everything once more.
        const final = yield* eventually(
          Effect.map(get(`${base}/metrics`), (r) => r.body),
          (text) =>
            text
              .split("\n")
              .filter((line) => line.startsWith("kafka_effect_consumer_lag{") && line.includes(`group="${group}"`))
              .every((line) => line.endsWith(" 0")),
          "lag 0"
        )
        assert.strictEqual(processed("retried")(metrics), 40)
        assert.strictEqual(processed("retried")(final), 40, "nothing processed twice")
        assert.strictEqual(sample(final, "kafka_effect_records_consumed_total", { topic }), 44)
        assert.strictEqual(sample(final, "kafka_effect_records_consumed_total", { topic: `${topic}-retry-1` }), 40)
        assert.strictEqual(sample(final, "kafka_effect_records_produced_total", { topic: `${topic}-retry-1` }), 40)
        assert.strictEqual(sample(final, "kafka_effect_records_produced_total", { topic: `${topic}-dlq` }), 4)
        // Every record handled: 44 on the main topic (the 4 invalid ones fail in decoding) and 40 retried.
        assert.strictEqual(sample(final, "kafka_effect_handler_duration_seconds_count", { topic }), 84)
        assert.isAbove(sample(final, "kafka_effect_commits_total", { group }) ?? 0, 0)
        assert.isAtLeast(sample(final, "kafka_effect_rebalances_total", { group }) ?? 0, 1)
        assert.isDefined(sample(final, "kafka_effect_reconnects_total", {}), "reconnects are exported")
        const lags = final.split("\n").filter((l) => l.startsWith("kafka_effect_consumer_lag{") && l.includes(group))
        assert.isAbove(lags.length, 0, "a lag gauge per partition")

        consumer.child.kill("SIGTERM")
        assert.strictEqual(yield* consumer.exited, 0)
        // Logs: every line is JSON; the ones about a record carry its coordinates.
        const lines = consumer
          .output()
          .stderr.split("\n")
          .filter((line) => line.startsWith("{"))
        const logs = lines.map(
          (line) => JSON.parse(line) as { message: unknown; level: string; annotations: Record<string, unknown> }
        )
        const deadLettered = logs.filter((log) => String(log.message).startsWith("dead-lettered"))
        assert.lengthOf(deadLettered, 4)
        for (const log of deadLettered) {
          assert.strictEqual(log.level, "ERROR")
          assert.strictEqual(log.annotations.topic, topic)
          assert.isNumber(log.annotations.partition)
          assert.match(String(log.annotations.offset), /^\d+$/)
          assert.match(String(log.annotations.key), /^bad-\d$/)
        }
      }).pipe(Effect.scoped),
    120_000
  )

  it.live(
    "a secret set in the configuration never appears in any output, even at debug level",
    () =>
      Effect.gen(function* () {
        const secret = "Sup3r-S3cret-Pa55word"
        const consumer = startConsumer({
          KAFKA_BROKERS: brokers,
          KAFKA_SASL_MECHANISM: "scram-sha-256",
          KAFKA_SASL_USERNAME: "alice",
          KAFKA_SASL_PASSWORD: secret,
          KAFKA_CONSUMER_GROUP_ID: uniqueName("secret-group"),
          KAFKA_CONSUMER_TOPIC: uniqueName("secret-topic"),
          LOG_LEVEL: "debug"
        })
        // The broker's plaintext listener does not speak SASL: the program fails to connect and exits.
        const code = yield* consumer.exited.pipe(
          Effect.timeoutOrElse({
            duration: "30 seconds",
            orElse: () => Effect.sync(() => consumer.child.kill("SIGKILL")).pipe(Effect.as(-1))
          })
        )
        const { stdout, stderr } = consumer.output()
        assert.isAbove(stderr.length, 0, "it did log")
        assert.notStrictEqual(code, 0)
        assert.notInclude(stdout, secret)
        assert.notInclude(stderr, secret)
        // A configuration problem with the secret variable names it without its value.
        const misconfigured = startConsumer({ KAFKA_BROKERS: brokers, KAFKA_SASL_PASSWORD: secret })
        assert.strictEqual(yield* misconfigured.exited, 2)
        const output = misconfigured.output()
        assert.include(output.stderr, "KAFKA_SASL_PASSWORD")
        assert.notInclude(output.stderr + output.stdout, secret)
      }),
    60_000
  )
})
