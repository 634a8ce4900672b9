import FlashAttentionShims
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#elseif canImport(Musl)
import Musl
#endif
import Synchronization

/// Threading: a persistent pool of worker threads that help callers run the work items of a call, and the
/// per-thread scratch memory the items use.
///
/// A call publishes a `Job` (an item count, a body, a thread cap). The caller always works on its own job;
/// idle workers join jobs that still have unclaimed items, up to the job's cap. Items are claimed one at a
/// time from an atomic counter (dynamic scheduling), so uneven items (causal blocks) balance themselves.
/// Several callers may run jobs at once: workers spread over them, and every caller makes progress on its
/// own job even when all workers are busy elsewhere, so a concurrent caller is never slower than running
/// alone on one thread.

/// A work plan: `itemCount` independent items, each writing its own part of the output.
public protocol WorkPlan: Sendable {
    var itemCount: Int { get }
    /// Scratch each participating thread needs for any item.
    var scratchBytes: Int { get }
    func run(item: Int, scratch: UnsafeMutableRawPointer)
}

/// One call's work as the pool sees it.
private final class Job: @unchecked Sendable {
    let count: Int
    let helperLimit: Int
    let scratchBytes: Int
    let body: @Sendable (Int, UnsafeMutableRawPointer) -> Void
    /// Next unclaimed item.
    let next = Atomic<Int>(0)
    /// Items finished (run or skipped after a failure).
    let finished = Atomic<Int>(0)
    /// Set when a participant could not get scratch memory; remaining items are skipped.
    let failed = Atomic<Bool>(false)
    /// Workers that joined; guarded by the pool's mutex.
    var helpers = 0

    private var mutex = pthread_mutex_t()
    private var done = pthread_cond_t()
    private var complete = false

    init(count: Int, helperLimit: Int, scratchBytes: Int, body: @escaping @Sendable (Int, UnsafeMutableRawPointer) -> Void) {
        self.count = count
        self.helperLimit = helperLimit
        self.scratchBytes = scratchBytes
        self.body = body
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&done, nil)
    }

    deinit {
        pthread_cond_destroy(&done)
        pthread_mutex_destroy(&mutex)
    }

    var hasUnclaimedItems: Bool { next.load(ordering: .relaxed) < count }

    /// Claims and runs items until none is left. Scratch is fetched only once an item has been claimed, so a
    /// helper that arrives after the last claim can neither allocate nor fail.
    func participate() {
        var scratch: UnsafeMutableRawPointer? = nil
        while true {
            let item = next.wrappingAdd(1, ordering: .relaxed).oldValue
            if item >= count { return }
            if scratch == nil && !failed.load(ordering: .relaxed) {
                scratch = ThreadScratch.items.acquire(bytes: scratchBytes)
                if scratch == nil { failed.store(true, ordering: .relaxed) }
            }
            if let scratch, !failed.load(ordering: .relaxed) { body(item, scratch) }
            if finished.wrappingAdd(1, ordering: .acquiringAndReleasing).newValue == count {
                pthread_mutex_lock(&mutex)
                complete = true
                pthread_cond_signal(&done)
                pthread_mutex_unlock(&mutex)
            }
        }
    }

    /// Returns once every item has finished (the caller's own items included).
    func waitUntilFinished() {
        // Helpers usually finish within microseconds of the caller; a short spin avoids a sleep and wake-up.
        var spins = 0
        while finished.load(ordering: .acquiring) < count && spins < 4000 { spins += 1 }
        pthread_mutex_lock(&mutex)
        while !complete { pthread_cond_wait(&done, &mutex) }
        pthread_mutex_unlock(&mutex)
    }
}

public final class ThreadPool: @unchecked Sendable {
    /// The process-wide pool: one worker per online core beyond the caller's own. Created on first use;
    /// Swift initialises globals under a once-lock, so concurrent first calls are safe.
    public static let shared = ThreadPool(workerCount: onlineCores - 1)

    /// Online cores (num_threads = 0 means this many threads).
    public static let onlineCores: Int = max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))

    private var mutex = pthread_mutex_t()
    private var wake = pthread_cond_t()
    /// Jobs that may still have unclaimed items; guarded by `mutex`.
    private var jobs: [Job] = []
    /// Set once, at unload; guarded by `mutex`.
    private var stopping = false
    private var workers: [pthread_t] = []
    public var workerCount: Int { workers.count }

    private init(workerCount: Int) {
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&wake, nil)
        for _ in 0..<max(0, workerCount) {
            // Darwin's pthread_t is a non-optional pointer (created through a `pthread_t?`), and its start
            // routine takes a non-optional argument: `startWorker` takes either.
            #if canImport(Darwin)
            var thread: pthread_t? = nil
            #else
            var thread = pthread_t()
            #endif
            let context = Unmanaged.passRetained(self).toOpaque()
            let started = pthread_create(&thread, nil, { startWorker($0) }, context)
            // A pool with fewer workers than asked is still correct, only slower.
            if started != 0 {
                Unmanaged<ThreadPool>.fromOpaque(context).release()
                break
            }
            #if canImport(Darwin)
            workers.append(thread!)
            #else
            workers.append(thread)
            #endif
        }
        fa_set_unload_hook { ThreadPool.shared.stop() }
    }

    /// Stops and joins the workers (at unload): each finishes the job it is helping with, then exits.
    private func stop() {
        pthread_mutex_lock(&mutex)
        stopping = true
        pthread_cond_broadcast(&wake)
        pthread_mutex_unlock(&mutex)
        for worker in workers { pthread_join(worker, nil) }
    }

    /// Runs every item of `plan` on up to `threads` threads (the caller included) and returns when all are
    /// done. Throws only if scratch memory could not be allocated.
    public func run<Plan: WorkPlan>(_ plan: Plan, threads: Int) throws(FlashAttentionError) {
        let count = plan.itemCount
        if count == 0 { return }
        let helpers = min(threads - 1, workerCount, count - 1)
        if helpers <= 0 {
            guard let scratch = ThreadScratch.items.acquire(bytes: plan.scratchBytes) else {
                throw .outOfMemory("could not allocate \(plan.scratchBytes) bytes of scratch memory")
            }
            for item in 0..<count { plan.run(item: item, scratch: scratch) }
            return
        }
        let job = Job(count: count, helperLimit: helpers, scratchBytes: plan.scratchBytes) { item, scratch in
            plan.run(item: item, scratch: scratch)
        }
        pthread_mutex_lock(&mutex)
        jobs.append(job)
        if helpers == 1 { pthread_cond_signal(&wake) } else { pthread_cond_broadcast(&wake) }
        pthread_mutex_unlock(&mutex)

        job.participate()

        pthread_mutex_lock(&mutex)
        jobs.removeAll { $0 === job }
        pthread_mutex_unlock(&mutex)
        job.waitUntilFinished()
        if job.failed.load(ordering: .relaxed) {
            throw .outOfMemory("could not allocate \(plan.scratchBytes) bytes of scratch memory for a thread")
        }
    }

    fileprivate func workerLoop() {
        while true {
            pthread_mutex_lock(&mutex)
            var job = nextJob()
            while job == nil && !stopping {
                pthread_cond_wait(&wake, &mutex)
                job = nextJob()
            }
            pthread_mutex_unlock(&mutex)
            guard let job else { return }
            job.participate()
        }
    }

    /// A job that still has unclaimed items and room for a helper; called with `mutex` held.
    private func nextJob() -> Job? {
        guard let job = jobs.first(where: { $0.hasUnclaimedItems && $0.helpers < $0.helperLimit }) else { return nil }
        job.helpers += 1
        return job
    }
}

/// Per-thread memory: one 64-byte-aligned, zero-filled (when first allocated) block per thread and use,
/// grown on demand and kept for the next call (no allocation in the steady state), freed when the thread
/// exits. `items` is what a thread's work items use; `calls` is what a call's driver holds for the length of
/// the call (split-KV partial results, the backward's statistics and dQ partials): kept, because fresh pages
/// are faulted in on every call otherwise, which in the VMs measured here took as long as the work (a
/// backward of (4, 32, 32, 512, 128) on 2 threads: 231 ms with a fresh 32 MB buffer per call, 124 ms reused).
struct ThreadScratch: Sendable {
    fileprivate struct Block {
        var bytes: Int
        var memory: UnsafeMutableRawPointer
    }

    static let items = ThreadScratch()
    static let calls = ThreadScratch()

    private let key: pthread_key_t?

    private init() {
        var key = pthread_key_t()
        // The destructor's argument is optional on Glibc and not on Darwin: `releaseBlock` takes either.
        let created = pthread_key_create(&key) { releaseBlock($0) }
        self.key = created == 0 ? key : nil
    }

    /// The calling thread's block of at least `bytes` bytes, or nil if memory ran out.
    func acquire(bytes: Int) -> UnsafeMutableRawPointer? {
        guard let key else { return nil }
        let block = pthread_getspecific(key)?.assumingMemoryBound(to: Block.self)
        if let block, block.pointee.bytes >= bytes { return block.pointee.memory }
        var memory: UnsafeMutableRawPointer? = nil
        let size = max(bytes, 64)
        guard posix_memalign(&memory, 64, size) == 0, let memory else { return nil }
        // Zero once, so that padding lanes a kernel reads but never uses hold finite values.
        memset(memory, 0, size)
        if let block {
            free(block.pointee.memory)
            block.pointee = Block(bytes: size, memory: memory)
            return memory
        }
        guard let fresh = malloc(MemoryLayout<Block>.size)?.bindMemory(to: Block.self, capacity: 1) else {
            free(memory)
            return nil
        }
        fresh.initialize(to: Block(bytes: size, memory: memory))
        if pthread_setspecific(key, fresh) != 0 {
            free(memory)
            free(fresh)
            return nil
        }
        return memory
    }
}

/// A calling thread keeps at most this much call memory between calls; larger needs are allocated and freed
/// per call.
let keptCallBytes = 256 << 20

/// Runs `body` with `bytes` bytes of call memory (64-byte aligned, contents unspecified): the calling
/// thread's kept block, or a temporary one above `keptCallBytes`. `what` names the memory in the error.
func withCallMemory(
    bytes: Int, for what: String, _ body: (UnsafeMutableRawPointer) throws(FlashAttentionError) -> Void
) throws(FlashAttentionError) {
    if bytes <= keptCallBytes, let memory = ThreadScratch.calls.acquire(bytes: bytes) { return try body(memory) }
    var memory: UnsafeMutableRawPointer? = nil
    guard posix_memalign(&memory, 64, max(bytes, 64)) == 0, let memory else {
        throw .outOfMemory("could not allocate \(bytes) bytes for \(what)")
    }
    defer { free(memory) }
    try body(memory)
}

/// A pool worker's thread body: `context` is the retained pool.
private func startWorker(_ context: UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? {
    Unmanaged<ThreadPool>.fromOpaque(context!).takeRetainedValue().workerLoop()
    return nil
}

/// Frees a thread's scratch block when the thread exits.
private func releaseBlock(_ block: UnsafeMutableRawPointer?) {
    guard let block = block?.assumingMemoryBound(to: ThreadScratch.Block.self) else { return }
    free(block.pointee.memory)
    free(block)
}
