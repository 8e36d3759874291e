/**
 * A consumer-group member as its own OS process, for the real-broker tests of the Consumer: configured by the
 * environment like the programs, it handles each record by waiting `HANDLER_DELAY_MS` and printing one line on
 * stdout, `processed <partition> <offset> <key> <value>`. Logs (assignments, commits at debug) go to stderr as
 * JSON. SIGTERM shuts it down gracefully.
 */
import { Duration, Effect, Layer } from "effect"
import * as Consumer from "../../src/Consumer.ts"
import { run } from "../../src/internal/main.ts"
import * as KafkaClient from "../../src/KafkaClient.ts"
import * as Observability from "../../src/Observability.ts"

const delay = Duration.millis(Number(process.env.HANDLER_DELAY_MS ?? "0"))
const text = (bytes: Uint8Array | null) => (bytes === null ? "" : new TextDecoder().decode(bytes))

const program = Consumer.run((record) =>
  Effect.sleep(delay).pipe(
    Effect.andThen(
      Effect.sync(() => {
        process.stdout.write(
          `processed ${record.partition} ${record.offset} ${text(record.key)} ${text(record.value)}\n`
        )
      })
    )
  )
).pipe(
  Effect.provide(Consumer.layerConfig.pipe(Layer.provideMerge(KafkaClient.layerConfig))),
  Effect.provide(Observability.layerLoggerConfig)
)

run(program)
