#!/usr/bin/env node
/**
 * `node dist/consumer.js`: runs the Processor on KAFKA_CONSUMER_TOPIC with the example handler, or replays dead
 * letters (`replay`). See src/programs/consumer.ts for the behaviour and `--help` for the flags.
 */
import "./programs/nodeVersion.ts"
import { applyHeapPolicy } from "./programs/heap.ts"

// Before the program's modules load: it may re-execute this process with the heap flags (src/programs/heap.ts).
applyHeapPolicy()
const { main } = await import("./programs/consumer.ts")
const { run } = await import("./programs/main.ts")

run(main(process.argv.slice(2)))
