/**
 * WorkerPool: a fixed number of worker fibers, each owning a bounded queue, with jobs sharded by key.
 *
 * A job goes to worker `fnv1a(key) mod workers`, and each worker runs its jobs one at a time in the order they
 * were submitted: jobs of one key never overlap and keep their order, while different keys run in parallel. Jobs
 * without a key are spread round-robin (they may run in parallel). Workers take their queue in chunks
 * (`Queue.takeBetween`), not one job per loop. At most `maxInFlight` jobs are queued or running: `submit` waits
 * beyond that, which is how a consumer stops fetching when the pool is full (backpressure), so memory stays flat
 * whatever the backlog.
 *
 * @example
 * ```ts
 * const pool = yield* WorkerPool.make({ workers: 8, maxInFlight: 1000 })
 * yield* pool.submit("user-1", Effect.log("handled in order for user-1"))
 * ```
 */
import { Deferred, Effect, Fiber, Queue, type Scope } from "effect"
import { prettyCause } from "./internal/cause.ts"

export interface WorkerPoolOptions {
  readonly workers: number
  /** most jobs (by weight) queued or running at once */
  readonly maxInFlight: number
  /** most jobs a worker takes from its queue at once. Default 64 */
  readonly chunk?: number | undefined
}

export interface WorkerPool {
  /**
   * Queues a job on its key's worker; waits while `maxInFlight` jobs are queued or running. The job must not
   * fail (handle errors inside it); it runs after every job submitted before it for the same key.
   */
  readonly submit: (key: string | Uint8Array | null, job: Effect.Effect<void>) => Effect.Effect<void>
  /**
   * Queues a job on a worker (`0 ≤ worker < workers`, from `workerOf`) counting as `weight` jobs towards
   * `maxInFlight` (at most `maxInFlight`): one job for a run of items, e.g. the records of a chunk that share a
   * worker, handled in order in one loop. It runs after every job submitted before it to that worker.
   */
  readonly submitTo: (worker: number, job: Effect.Effect<void>, weight: number) => Effect.Effect<void>
  /**
   * Queues a job on a worker (`0 ≤ worker < workers`) without taking places of `maxInFlight`: for a caller that
   * bounds its own submissions (the consumer's commit window), so that places are neither counted twice nor held
   * by jobs that finished. At most `maxInFlight` jobs fit in a worker's queue; beyond that the offer waits.
   */
  readonly offerTo: (worker: number, job: Effect.Effect<void>) => Effect.Effect<void>
  /** the worker of a key (`shardOf`); keys that are null are spread round-robin */
  readonly workerOf: (key: string | Uint8Array | null) => number
  /** jobs (by weight) queued or running */
  readonly inFlight: Effect.Effect<number>
}

const encoder = new TextEncoder()

/**
 * The worker of a key: the same for a key as long as the number of workers does not change. FNV-1a, not the
 * partitioner's murmur2: with murmur2, `hash mod workers` and `hash mod partitions` share their low bits, so the
 * keys of one partition would reach only `workers / partitions` of the workers.
 */
export const shardOf = (key: string | Uint8Array, workers: number): number => {
  const bytes = typeof key === "string" ? encoder.encode(key) : key
  let hash = 0x811c9dc5
  for (let i = 0; i < bytes.length; i++) hash = Math.imul(hash ^ (bytes[i] as number), 0x01000193)
  return (hash >>> 0) % workers
}

interface Job {
  readonly run: Effect.Effect<void>
  readonly weight: number
}

/** A submit waiting for places, in the gate's line. */
interface Waiter {
  readonly places: number
  readonly granted: Deferred.Deferred<void>
  /** interrupted while it waited: skipped */
  cancelled: boolean
}

/**
 * The places of `maxInFlight`, handed out first come, first served. A plain counter and an array walked by one loop:
 * however many submits wait, taking and giving back places cost the same (a Semaphore rescans its waiters at each
 * step, which made 100,000 waiting submits take minutes).
 */
const makeGate = (capacity: number) => {
  let free = capacity
  let line: Array<Waiter> = []
  let head = 0
  const release = (places: number) => {
    free += places
    while (head < line.length) {
      const next = line[head] as Waiter
      if (!next.cancelled) {
        if (next.places > free) break
        free -= next.places
        Deferred.doneUnsafe(next.granted, Effect.void)
      }
      head++
    }
    if (head === line.length) {
      line = []
      head = 0
    } else if (head > 1024 && head * 2 > line.length) {
      line = line.slice(head)
      head = 0
    }
  }
  /** Takes `places`, waiting in line for them; `then` runs once they are held, and is not interrupted. */
  const take = <A>(places: number, then: Effect.Effect<A>): Effect.Effect<A> =>
    Effect.suspend(() => {
      if (head === line.length && free >= places) {
        free -= places
        return then
      }
      const waiter: Waiter = { places, granted: Deferred.makeUnsafe(), cancelled: false }
      line.push(waiter)
      return Effect.uninterruptibleMask((restore) =>
        restore(Deferred.await(waiter.granted)).pipe(
          Effect.onInterrupt(() =>
            Effect.sync(() => {
              // Granted as it was interrupted: the places go back to the next in line. Not granted: it leaves the
              // line, and those behind it may go now (it may have been the head, holding them up).
              if (Deferred.isDoneUnsafe(waiter.granted)) release(places)
              else {
                waiter.cancelled = true
                release(0)
              }
            })
          ),
          Effect.andThen(then)
        )
      )
    })
  return { take, release }
}

/** A pool for the life of the scope; closing the scope interrupts the workers (jobs not run are dropped). */
export const make = (options: WorkerPoolOptions): Effect.Effect<WorkerPool, never, Scope.Scope> =>
  Effect.gen(function* () {
    const chunk = options.chunk ?? 64
    const gate = makeGate(options.maxInFlight)
    let running = 0
    // Each queue can hold every job in flight, so an offer never waits once places are held.
    const queues = yield* Effect.forEach(Array.from({ length: options.workers }), () =>
      Queue.bounded<Job>(options.maxInFlight)
    )
    const worker = (queue: Queue.Queue<Job>) =>
      Effect.forever(
        Effect.flatMap(Queue.takeBetween(queue, 1, chunk), (jobs) => {
          let weight = 0
          for (const job of jobs) weight += job.weight
          // Places are given back per chunk, not per job: one release for the lot.
          // A job that fails or dies (a bug: jobs handle their own failures) is logged; the worker goes on, or
          // every job queued behind it on this shard would wait for ever.
          return Effect.forEach(
            jobs,
            (job) =>
              Effect.catchCause(job.run, (cause) => Effect.logError("a worker pool job failed", prettyCause(cause))),
            { discard: true }
          ).pipe(
            Effect.ensuring(
              Effect.sync(() => {
                if (weight === 0) return
                running -= weight
                gate.release(weight)
              })
            )
          )
        })
      )
    const fibers = yield* Effect.forEach(queues, (queue) => Effect.forkScoped(worker(queue)))
    yield* Effect.addFinalizer(() => Fiber.interruptAll(fibers))

    let roundRobin = 0
    const workerOf = (key: string | Uint8Array | null) =>
      key === null ? roundRobin++ % options.workers : shardOf(key, options.workers)
    const submitTo = (shard: number, run: Effect.Effect<void>, weight: number) => {
      const held = Math.max(1, Math.min(weight, options.maxInFlight))
      return gate.take(
        held,
        Effect.suspend(() => {
          running += held
          return Effect.asVoid(Queue.offer(queues[shard] as Queue.Queue<Job>, { run, weight: held }))
        })
      )
    }
    const submit = (key: string | Uint8Array | null, job: Effect.Effect<void>) => submitTo(workerOf(key), job, 1)
    const offerTo = (shard: number, run: Effect.Effect<void>) =>
      Effect.asVoid(Queue.offer(queues[shard] as Queue.Queue<Job>, { run, weight: 0 }))

    return { submit, submitTo, offerTo, workerOf, inFlight: Effect.sync(() => running) }
  })
