#!/usr/bin/env node
/**
 * `node dist/producer.js`: sends events to KAFKA_PRODUCER_TOPIC — NDJSON from stdin, or generated samples.
 * See src/programs/producer.ts for the behaviour and `--help` for the flags.
 */
import "./programs/nodeVersion.ts"
import { run } from "./programs/main.ts"
import { main } from "./programs/producer.ts"

run(main(process.argv.slice(2)))
