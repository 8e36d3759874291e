/**
 * The programs' memory policy, applied before anything heavy loads: unless the user chose heap flags of their own,
 * the program replaces itself (`process.execve`: same PID, same stdio, same signals) with the same command plus
 * `heapFlags`. V8's defaults let a busy consumer's heap grow to ~500 MB before collecting much; these flags make it
 * collect earlier and in a smaller young generation, with no hard cap (a cap we chose would turn large records
 * into a crash). Measured on 1,000,000 × 200 B events at the defaults: peak RSS 516 MB → 219 MB, at about 0.7× the
 * throughput (docs/benchmarks.md, P4).
 *
 * Any of these flags in `NODE_OPTIONS` or on node's command line turns the policy off: the user's word wins.
 */

/** what the programs run with when the user says nothing */
export const heapFlags: ReadonlyArray<string> = ["--max-semi-space-size=8", "--heap-growing-percent=10"]

const userHeapFlag = /(^|\s)--(max-old-space-size|max-semi-space-size|max-heap-size|heap-growing-percent)\b/

/** true when the user set a heap flag of their own (on node's command line or in NODE_OPTIONS) */
export const userChoseHeap = (execArgv: ReadonlyArray<string>, nodeOptions: string | undefined): boolean =>
  execArgv.some((flag) => userHeapFlag.test(flag)) || userHeapFlag.test(nodeOptions ?? "")

/**
 * Re-executes this program with `heapFlags` unless the user chose their own, or the platform cannot (no
 * `process.execve`: Windows, or Node before 22.15/23.11; the program then runs with V8's defaults).
 * Returns only when it did not re-execute.
 */
export const applyHeapPolicy = (): void => {
  const execve = (process as { execve?: (file: string, args: Array<string>, env: NodeJS.ProcessEnv) => never }).execve
  if (execve === undefined || userChoseHeap(process.execArgv, process.env.NODE_OPTIONS)) return
  const script = process.argv[1]
  if (script === undefined) return
  execve(
    process.execPath,
    [process.execPath, ...heapFlags, ...process.execArgv, script, ...process.argv.slice(2)],
    process.env
  )
}
