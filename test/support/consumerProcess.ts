/**
 * A consumer-group member as its own OS process, for the real-broker tests of the Consumer: configured by the
 * environment like the programs, it handles each record by waiting `HANDLER_DELAY_MS` and printing one line on
 * stdout, `processed <partition> <offset> <key> <value>`. Logs (assignments, commits at debug) go to stderr as
 * JSON. SIGTERM shuts it down gracefully.
 *
 * With PROGRESS_EVERY=n it prints only `count <total>` every n records: a line per record would hold the handlers up
 * whenever the reader is slower, which is not what a memory benchmark should measure.
 */
import { Duration, Effect, Layer } from "effect"
import * as KafkaClient from "../../src/KafkaClient.ts"
import * as KafkaConfig from "../../src/KafkaConfig.ts"
import * as KafkaConsumer from "../../src/KafkaConsumer.ts"
import * as Observability from "../../src/Observability.ts"
import { boundShutdown, run } from "../../src/programs/main.ts"
import { writeLine } from "./writeLine.ts"

const delay = Duration.millis(Number(process.env.HANDLER_DELAY_MS ?? "0"))
const progressEvery = Number(process.env.PROGRESS_EVERY ?? "0")
const text = (bytes: Uint8Array | null) => (bytes === null ? "" : new TextDecoder().decode(bytes))
let handled = 0

const report = (record: {
  readonly partition: number
  readonly offset: bigint
  readonly key: Uint8Array | null
  readonly value: Uint8Array | null
}) => {
  handled++
  if (progressEvery > 0) {
    if (handled % progressEvery === 0) writeLine(`count ${handled}`)
  } else {
    writeLine(`processed ${record.partition} ${record.offset} ${text(record.key)} ${text(record.value)}`)
  }
}

const program = Effect.gen(function* () {
  // The consumer program's bound (src/programs/consumer.ts): the shutdown timeout, 5 s for the last commits, 3 s to
  // leave the group, and a margin. A member stopped during a rebalance waits out the commit and the leave.
  const config = yield* KafkaConfig.consumer
  yield* boundShutdown(Duration.sum(config.shutdownTimeout, Duration.seconds(15)))
  yield* KafkaConsumer.run((record) => Effect.sleep(delay).pipe(Effect.andThen(Effect.sync(() => report(record)))))
}).pipe(
  Effect.provide(KafkaConsumer.layerConfig.pipe(Layer.provideMerge(KafkaClient.layerConfig))),
  Effect.provide(Observability.layerLoggerConfig)
)

run(program)
