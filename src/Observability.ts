/**
 * Observability: the logger, the health of the services, the HTTP endpoint for metrics and probes, and tracing
 * export — each a Layer, and `layerConfig` with all of them as the environment sets them.
 *
 * - Logs: `LOG_LEVEL` sets the minimum level; `LOG_FORMAT` picks `json` (one JSON object a line, for log shippers)
 *   or `pretty`; unset, it is json when stdout is not a terminal. Logs go to stderr, so that a program's stdout
 *   carries only its own output (a summary, say).
 * - Health: services report whether they are ready (`Health.report`): the producer once connected, a consumer
 *   once it is a member of its group (with partitions, or none because the group has more members than
 *   partitions: idle by design). Without a `Health` in context reports go nowhere.
 * - HTTP (`METRICS_PORT`, bound to `METRICS_HOST`, 127.0.0.1 by default): `GET /metrics` in Prometheus' text format
 *   (the `Metrics` module, prefixed `kafka_effect_`), `GET /healthz` (200 while the process runs) and `GET /readyz`
 *   (200 when every reporting service is ready, else 503, with the services' states as JSON).
 * - Tracing: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans (and logs and metrics) are exported over OTLP/HTTP as
 *   `OTEL_SERVICE_NAME`; unset, nothing is exported.
 *
 * @example
 * ```ts
 * NodeRuntime.runMain(program.pipe(Effect.provide(Observability.layerConfig)))
 * ```
 */
import * as Http from "node:http"
import { NodeHttpServer } from "@effect/platform-node"
import { Context, Effect, Layer, Logger, Metric, Option, References } from "effect"
import { FetchHttpClient, HttpRouter, HttpServerResponse } from "effect/http"
import { Otlp, PrometheusMetrics } from "effect/observability"
import * as KafkaConfig from "./KafkaConfig.ts"
import * as Metrics from "./Metrics.ts"

/** The prefix of every metric name on `/metrics`. */
export const metricsPrefix = "kafka_effect"

// ---------------------------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------------------------

/** The logger for a given level and format. */
export const layerLogger = (logging: KafkaConfig.LoggingConfig): Layer.Layer<never> => {
  const format = Option.getOrElse(logging.format, () => (process.stdout.isTTY ? "pretty" : "json"))
  return Layer.mergeAll(
    // Logger.consoleJson writes to stdout; the JSON logger here writes to stderr like the pretty one.
    Logger.layer([format === "json" ? Logger.withConsoleError(Logger.formatJson) : Logger.consolePretty()]),
    Layer.succeed(Logger.LogToStderr, true),
    Layer.succeed(References.MinimumLogLevel, logging.level)
  )
}

/** The logger configured from `LOG_LEVEL` and `LOG_FORMAT`. */
export const layerLoggerConfig: Layer.Layer<never, KafkaConfig.KafkaConfigError> = Layer.unwrap(
  Effect.map(KafkaConfig.logging, layerLogger)
)

// ---------------------------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------------------------

export class Health extends Context.Service<
  Health,
  {
    /**
     * Records whether a service (named, e.g. `producer`, `consumer event-processor-group`) is ready, and when it is
     * not, why (shown by `/readyz`).
     */
    readonly report: (service: string, ready: boolean, reason?: string | undefined) => Effect.Effect<void>
    /** Ready when at least one service reported and all are ready; `reasons` of the services that are not. */
    readonly status: Effect.Effect<{
      readonly ready: boolean
      readonly services: Readonly<Record<string, boolean>>
      readonly reasons: Readonly<Record<string, string>>
    }>
  }
>()("kafka-effect/Health") {}

export const layerHealth: Layer.Layer<Health> = Layer.sync(Health, () => {
  const services = new Map<string, boolean>()
  const reasons = new Map<string, string>()
  return Health.of({
    report: (service, ready, reason) =>
      Effect.sync(() => {
        services.set(service, ready)
        if (!ready && reason !== undefined) reasons.set(service, reason)
        else reasons.delete(service)
      }),
    status: Effect.sync(() => ({
      ready: services.size > 0 && [...services.values()].every(Boolean),
      services: Object.fromEntries(services),
      reasons: Object.fromEntries(reasons)
    }))
  })
})

/** Reports to the `Health` in context, if there is one. */
export const report = (service: string, ready: boolean, reason?: string | undefined): Effect.Effect<void> =>
  Effect.flatMap(Effect.serviceOption(Health), (health) =>
    Option.isSome(health) ? health.value.report(service, ready, reason) : Effect.void
  )

// ---------------------------------------------------------------------------------------------------------------
// HTTP: /metrics, /healthz, /readyz
// ---------------------------------------------------------------------------------------------------------------

const readyz = Effect.gen(function* () {
  const health = yield* Health
  const status = yield* health.status
  return HttpServerResponse.jsonUnsafe(status, { status: status.ready ? 200 : 503 })
})

/** The HTTP endpoint on `port` (0: a free port the OS picks) at `host`. */
export const layerHttp = (options: {
  readonly port: number
  readonly host: string
}): Layer.Layer<never, never, Health> =>
  HttpRouter.serve(
    Layer.mergeAll(
      PrometheusMetrics.layerHttp({ path: "/metrics", prefix: metricsPrefix }),
      HttpRouter.add("GET", "/healthz", HttpServerResponse.text("ok")),
      HttpRouter.add("GET", "/readyz", readyz)
    ),
    { disableLogger: true, disableListenLog: true }
  ).pipe(
    Layer.provide(NodeHttpServer.layer(() => Http.createServer(), { port: options.port, host: options.host })),
    Layer.orDie,
    // A metric appears once updated: show the counters without attributes at 0 from the start.
    Layer.merge(Layer.effectDiscard(Metric.update(Metrics.reconnects, 0)))
  )

// ---------------------------------------------------------------------------------------------------------------
// Tracing
// ---------------------------------------------------------------------------------------------------------------

/** OTLP/HTTP export of spans, logs and metrics to `endpoint` (e.g. http://localhost:4318). */
export const layerOtlp = (options: { readonly endpoint: string; readonly serviceName: string }) =>
  Otlp.layerJson({ baseUrl: options.endpoint, resource: { serviceName: options.serviceName } }).pipe(
    Layer.provide(FetchHttpClient.layer)
  )

// ---------------------------------------------------------------------------------------------------------------
// All of it
// ---------------------------------------------------------------------------------------------------------------

/** Logger, Health, the HTTP endpoint when METRICS_PORT is set, OTLP export when its endpoint is set. */
export const layerConfig: Layer.Layer<Health, KafkaConfig.KafkaConfigError> = Layer.unwrap(
  Effect.gen(function* () {
    const logging = yield* KafkaConfig.logging
    const config = yield* KafkaConfig.observability
    const http = Option.match(config.metricsPort, {
      onNone: () => Layer.empty,
      onSome: (port) => layerHttp({ port, host: config.metricsHost })
    })
    const otlp = Option.match(config.otlpEndpoint, {
      onNone: () => Layer.empty,
      onSome: (endpoint) => layerOtlp({ endpoint, serviceName: config.serviceName })
    })
    return Layer.mergeAll(http, otlp, layerLogger(logging)).pipe(Layer.provideMerge(layerHealth))
  })
)
