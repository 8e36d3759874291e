/**
 * `node dist/producer.js`: sends events to KAFKA_PRODUCER_TOPIC — NDJSON from stdin, or generated samples.
 * See src/internal/producerMain.ts for the behaviour and `--help` for the flags.
 */
import { run } from "./internal/main.ts"
import { main } from "./internal/producerMain.ts"

run(main(process.argv.slice(2)))
