import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// New event ids: random UUIDs (version 4), lowercase, from the operating system's randomness.
///
/// Foundation's `UUID()` on Linux opens, reads and closes `/dev/urandom` for every UUID: three system calls,
/// about 4 µs back to back and about 50 µs on a thread that has just woken up, which is how a producer
/// publishing one event at a time calls it. Here one `getentropy` call fills a buffer that serves 16 ids.
/// A child process made by `fork` refills its buffer before its first id, so parent and child never share one.
public enum EventID {
    /// A new random id, e.g. `0b7c5a52-3f7e-4c49-a0d8-5e3c2b9f1a64`.
    public static func random() -> String {
        let generation = forkGeneration.load(ordering: .relaxed)
        var bytes: (UInt64, UInt64) = (0, 0)
        pool.withLock { $0.take(into: &bytes, generation: generation) }
        return withUnsafeBytes(of: &bytes) { UUIDText.format($0, version: 4) }
    }

    private static let pool: Mutex<RandomPool> = {
        registerForkHandler
        return Mutex(RandomPool())
    }()

    /// Counts forks in this process; bumped in the child, where only the forking thread goes on.
    fileprivate static let forkGeneration = Atomic<Int>(0)
    private static let registerForkHandler: Void = {
        _ = pthread_atfork(nil, nil) { EventID.forkGeneration.add(1, ordering: .relaxed) }
    }()
}

/// Random bytes read from the operating system a buffer at a time.
private struct RandomPool {
    private var buffer = [UInt8](repeating: 0, count: 256)
    private var used = 256
    private var generation = -1

    mutating func take(into bytes: inout (UInt64, UInt64), generation current: Int) {
        let size = MemoryLayout.size(ofValue: bytes)
        if used + size > buffer.count || generation != current {
            refill()
            generation = current
        }
        withUnsafeMutableBytes(of: &bytes) { out in
            buffer.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[used..<used + size])) }
        }
        used += size
    }

    private mutating func refill() {
        buffer.withUnsafeMutableBytes { out in
            // At most 256 bytes per call; fails only where the system has no such call (Linux before 3.17).
            if getentropy(out.baseAddress, out.count) != 0 {
                var generator = SystemRandomNumberGenerator()
                for i in 0..<out.count { out[i] = generator.next() }
            }
        }
        used = 0
    }
}

/// The text form of a UUID, 36 lowercase characters.
enum UUIDText {
    private static let hexDigits = Array("0123456789abcdef".utf8)

    /// The first 16 of `bytes` as a UUID of `version` (4: random, 5: name-based with SHA), RFC 4122 variant.
    static func format(_ bytes: UnsafeRawBufferPointer, version: UInt8) -> String {
        String(unsafeUninitializedCapacity: 36) { out in
            let hex = hexDigits
            var n = 0
            for i in 0..<16 {
                var b = bytes[i]
                if i == 6 { b = (b & 0x0F) | version << 4 }
                if i == 8 { b = (b & 0x3F) | 0x80 }
                if i == 4 || i == 6 || i == 8 || i == 10 {
                    out[n] = UInt8(ascii: "-")
                    n += 1
                }
                out[n] = hex[Int(b >> 4)]
                out[n + 1] = hex[Int(b & 0x0F)]
                n += 2
            }
            return n
        }
    }
}
