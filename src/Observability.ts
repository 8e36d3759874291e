/**
 * Observability: the logger of the programs and of applications that want ours.
 *
 * `LOG_LEVEL` sets the minimum level; `LOG_FORMAT` picks `json` (one JSON object a line, for log shippers) or
 * `pretty`; unset, it is json when stdout is not a terminal. Logs go to stderr, so that a program's stdout
 * carries only its own output (the producer's summary, say).
 */
import { Effect, Layer, Logger, Option, References } from "effect"
import * as KafkaConfig from "./Config.ts"

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
