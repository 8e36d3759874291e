/** What the benchmarks share. */
import { Duration, Effect, Layer, Option } from "effect"
import * as KafkaClient from "../src/KafkaClient.ts"
import type * as KafkaConfig from "../src/KafkaConfig.ts"

export type Engine = KafkaConfig.Engine

/** Our KafkaClient on `brokers` over `engine`, with the defaults of the environment's configuration. */
export const clientLayer = (brokers: string, engine: Engine = "kafkajs") =>
  Layer.unwrap(
    Effect.map(KafkaClient.loadEngine(engine), (module) =>
      module.layer({
        engine,
        brokers: brokers.split(","),
        clientId: "bench",
        sasl: Option.none(),
        tls: Option.none(),
        connectionTimeout: Duration.seconds(10),
        requestTimeout: Duration.seconds(30),
        reconnectBackoff: Duration.millis(200),
        reconnectBackoffMax: Duration.seconds(5)
      } satisfies KafkaConfig.ConnectionConfig)
    )
  )

/**
 * The engines a benchmark compares, from `--engine kafkajs|platformatic|both` on its command line (kafkajs when
 * absent, as the default engine).
 */
export const enginesFromArgs = (args: ReadonlyArray<string>): ReadonlyArray<Engine> => {
  const at = args.indexOf("--engine")
  const value = at >= 0 ? args[at + 1] : "kafkajs"
  switch (value) {
    case "kafkajs":
    case "platformatic":
      return [value]
    case "both":
      return ["kafkajs", "platformatic"]
    default:
      throw new Error(`--engine must be kafkajs, platformatic or both, got ${value}`)
  }
}
