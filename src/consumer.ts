#!/usr/bin/env node
/**
 * `node dist/consumer.js`: runs the Processor on KAFKA_CONSUMER_TOPIC with the example handler, or replays dead
 * letters (`replay`). See src/programs/consumer.ts for the behaviour and `--help` for the flags.
 */
import "./programs/nodeVersion.ts"
import { main } from "./programs/consumer.ts"
import { run } from "./programs/main.ts"

run(main(process.argv.slice(2)))
