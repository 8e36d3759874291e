/**
 * Metrics: what the producer, consumer and processor count, as Effect `Metric`s. `Observability.layerHttp` serves
 * them in Prometheus' text format (names below, with the `kafka_effect_` prefix of `Observability.metricsPrefix`).
 *
 * | Metric | Kind | Attributes | Meaning |
 * | --- | --- | --- | --- |
 * | `records_produced_total` | counter | topic | records the broker acked |
 * | `records_produce_failed_total` | counter | topic | records whose send failed for good (not stored) |
 * | `dead_letter_values_dropped_total` | counter | topic | dead letters stored without their value (too large) |
 * | `produce_latency_seconds` | histogram | | one produce request, retries included |
 * | `records_consumed_total` | counter | topic | records delivered to the worker pool |
 * | `records_processed_total` | counter | topic, outcome | processor outcomes: `done`, `retried`, `dead_lettered` |
 * | `handler_duration_seconds` | histogram | topic | one handler run |
 * | `records_in_flight` | gauge | group | delivered and not yet committed |
 * | `commits_total` | counter | group | successful offset commits |
 * | `consumer_lag` | gauge | group, topic, partition | records after the last one handled, as of its fetch |
 * | `rebalances_total` | counter | group | assignments received |
 * | `reconnects_total` | counter | | connection attempts that failed and were retried |
 *
 * @example
 * ```ts
 * const produced = yield* Metric.value(Metrics.recordsProduced)
 * ```
 */
import { Metric } from "effect"

/** Records the broker acked, by topic. */
export const recordsProduced = Metric.counter("records_produced_total", {
  description: "records the broker acked",
  incremental: true
})
/** Records whose send failed for good and that were not stored, by topic. */
export const recordsProduceFailed = Metric.counter("records_produce_failed_total", {
  description: "records whose send failed for good",
  incremental: true
})
/** A dead letter the broker refused as too large, stored again without its value (`kafka-effect-value-dropped`). */
export const deadLetterValuesDropped = Metric.counter("dead_letter_values_dropped_total", {
  description: "dead letters stored without their value, as too large for the dead-letter topic",
  incremental: true
})
/** One successful produce request, its retries included, in seconds. */
export const produceLatency = Metric.histogram("produce_latency_seconds", {
  description: "one produce request, retries included",
  boundaries: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
})
/** Records delivered to the worker pool, by topic. */
export const recordsConsumed = Metric.counter("records_consumed_total", {
  description: "records delivered to the worker pool",
  incremental: true
})
/** Processor outcomes by topic and `outcome`: done, retried, dead_lettered, skipped. */
export const recordsProcessed = Metric.counter("records_processed_total", {
  description: "processor outcomes: done, retried (sent to a retry topic), dead_lettered, skipped (another group's)",
  incremental: true
})
/** Processing one record (decoding and the handler with its in-place retries), in seconds, by topic. */
export const handlerDuration = Metric.histogram("handler_duration_seconds", {
  description: "processing one record: decoding and the handler with its in-place retries",
  boundaries: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
})
/** Records delivered and not yet committed, by group. */
export const recordsInFlight = Metric.gauge("records_in_flight", {
  description: "records delivered and not yet committed"
})
/** Successful offset commits, by group. */
export const commits = Metric.counter("commits_total", { description: "successful offset commits", incremental: true })
/** Records after the last one handled in a partition, as of its fetch, by group, topic and partition. */
export const consumerLag = Metric.gauge("consumer_lag", {
  description: "records after the last one handled (or committed, while its batch runs) in a partition, as of its fetch"
})
/** Assignments received (the first join included), by group. */
export const rebalances = Metric.counter("rebalances_total", {
  description: "assignments received (joins and rebalances)",
  incremental: true
})
/** Connection attempts that failed and were retried on the reconnect schedule. */
export const reconnects = Metric.counter("reconnects_total", {
  description: "connection attempts that failed and were retried",
  incremental: true
})

/** Processor outcomes, as `records_processed_total`'s `outcome` attribute. */
export type Outcome = "done" | "retried" | "dead_lettered"

/**
 * `metric` with `attributes`, made once per distinct set: records pass through these at high rates, and a metric
 * with attributes is an object worth keeping.
 */
export const tagged = <M extends Metric.Metric<number, unknown>>(metric: M) => {
  const cache = new Map<string, M>()
  return (attributes: Readonly<Record<string, string>>): M => {
    const key = Object.values(attributes).join("\u0000")
    let found = cache.get(key)
    if (found === undefined) {
      found = Metric.withAttributes(metric, attributes) as M // withAttributes keeps the metric's kind; its type widens
      cache.set(key, found)
    }
    return found
  }
}
