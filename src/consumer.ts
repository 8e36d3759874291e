/**
 * `node dist/consumer.js`: runs the Processor on KAFKA_CONSUMER_TOPIC with the example handler, or replays dead
 * letters (`replay`). See src/internal/consumerMain.ts for the behaviour and `--help` for the flags.
 */
import { main } from "./internal/consumerMain.ts"
import { run } from "./internal/main.ts"

run(main(process.argv.slice(2)))
