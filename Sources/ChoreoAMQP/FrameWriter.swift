import CRabbitMQ

#if canImport(Glibc)
    import Glibc
#endif

/// Publishes encoded into one buffer and written to the socket with one `send`.
///
/// `amqp_basic_publish` sends each of a message's frames (method, content header, body) with a system
/// call of its own: three per message, a tenth of a handler's CPU per event. Here the frames are encoded
/// with rabbitmq-c's own encoders into a buffer that is written once per publish, or once per batch.
///
/// Plain TCP only: rabbitmq-c writes whole frames before it returns, so between two of its calls the
/// socket is ours, and writing a finished buffer there keeps every frame whole and in order. Over TLS
/// the bytes have to go through rabbitmq-c's SSL socket, and publishes use `amqp_basic_publish`.
final class FrameWriter {
    private var base: UnsafeMutableRawPointer
    private var capacity: Int
    private(set) var count = 0
    /// Kept after a flush; a larger buffer (a big body went out) is given back.
    private static let keptCapacity = 1 << 20

    init() {
        capacity = 64 * 1024
        base = .allocate(byteCount: capacity, alignment: 8)
    }

    deinit { base.deallocate() }

    var isEmpty: Bool { count == 0 }

    /// Appends the frames of one basic.publish. On an encoding error nothing is appended.
    func appendPublish(
        channel: UInt16, exchange: amqp_bytes_t, routingKey: amqp_bytes_t, mandatory: Bool,
        properties: inout amqp_basic_properties_t, body: UnsafeRawBufferPointer, frameMax: Int
    ) -> Int32 {
        let start = count
        // The negotiated size is at least 4096 (the client proposes no less); never trust a smaller one.
        let payloadMax = max(frameMax, 4096) - Self.overhead
        // Method frame: the method id, then its arguments (ticket, exchange, routing key, flags).
        var method = amqp_basic_publish_t(
            ticket: 0, exchange: exchange, routing_key: routingKey, mandatory: mandatory ? 1 : 0, immediate: 0)
        let methodLength = frame(type: AMQP_FRAME_METHOD, channel: channel, maxPayload: payloadMax) { p, room in
            p.storeBytes(of: UInt32(CHOREO_BASIC_PUBLISH).bigEndian, as: UInt32.self)
            let n = amqp_encode_method(CHOREO_BASIC_PUBLISH, &method, amqp_bytes_t(len: room - 4, bytes: p + 4))
            return n < 0 ? n : n + 4
        }
        guard methodLength >= 0 else { return rollBack(to: start, methodLength) }
        // Content header frame: class, weight, body size, then the property flags and properties.
        let headerLength = frame(type: AMQP_FRAME_HEADER, channel: channel, maxPayload: payloadMax) { p, room in
            p.storeBytes(of: UInt16(AMQP_BASIC_CLASS).bigEndian, as: UInt16.self)
            (p + 2).storeBytes(of: UInt16(0), as: UInt16.self)
            (p + 4).storeBytes(of: UInt64(body.count).bigEndian, toByteOffset: 0, as: UInt64.self)
            let n = amqp_encode_properties(
                UInt16(AMQP_BASIC_CLASS), &properties, amqp_bytes_t(len: room - 12, bytes: p + 12))
            return n < 0 ? n : n + 12
        }
        guard headerLength >= 0 else { return rollBack(to: start, headerLength) }
        // Body frames, each at most the negotiated frame size.
        var offset = 0
        while offset < body.count {
            let length = min(payloadMax, body.count - offset)
            _ = frame(type: AMQP_FRAME_BODY, channel: channel, maxPayload: length) { p, _ in
                p.copyMemory(from: body.baseAddress! + offset, byteCount: length)
                return Int32(length)
            }
            offset += length
        }
        return AMQP_STATUS_OK.rawValue
    }

    enum Flush {
        case written
        /// The socket had no room; what was not written is kept, in order, for the next flush.
        case wouldWait
        /// The socket failed with this `errno` (the connection is lost); nothing is kept.
        case failed(Int32)
    }

    /// Writes everything appended to `fd`. With `waiting`, waits for room in the socket's buffer as
    /// rabbitmq-c does; without, stops where the socket is full and keeps the rest.
    func flush(to fd: Int32, waiting: Bool) -> Flush {
        var sent = 0
        while sent < count {
            let n = send(fd, base + sent, count - sent, Int32(MSG_NOSIGNAL | (waiting ? 0 : MSG_DONTWAIT)))
            if n > 0 {
                sent += n
                continue
            }
            let code = n < 0 ? errno : EPIPE
            if code == EINTR { continue }
            guard code == EAGAIN || code == EWOULDBLOCK else {
                discard()
                return .failed(code)
            }
            guard waiting else {
                memmove(base, base + sent, count - sent)
                count -= sent
                return .wouldWait
            }
            var pfd = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            if poll(&pfd, 1, -1) < 0 && errno != EINTR {
                let code = errno
                discard()
                return .failed(code)
            }
        }
        discard()
        return .written
    }

    /// Drops what was appended and not written (also after a flush); a larger buffer (a big body went out)
    /// is given back.
    func discard() {
        count = 0
        if capacity > Self.keptCapacity {
            base.deallocate()
            capacity = 64 * 1024
            base = .allocate(byteCount: capacity, alignment: 8)
        }
    }

    /// Frame header (type, channel, payload size) and end octet around a payload of at most `maxPayload`
    /// bytes that `fill` writes and measures; returns `fill`'s result, negative for an encoding error.
    private func frame(
        type: Int32, channel: UInt16, maxPayload: Int, _ fill: (UnsafeMutableRawPointer, Int) -> Int32
    ) -> Int32 {
        reserve(maxPayload + Self.overhead)
        let p = base + count
        p.storeBytes(of: UInt8(type), as: UInt8.self)
        (p + 1).storeBytes(of: channel.bigEndian, toByteOffset: 0, as: UInt16.self)
        let length = fill(p + 7, maxPayload)
        guard length >= 0 else { return length }
        (p + 3).storeBytes(of: UInt32(length).bigEndian, toByteOffset: 0, as: UInt32.self)
        (p + 7 + Int(length)).storeBytes(of: UInt8(AMQP_FRAME_END), as: UInt8.self)
        count += 7 + Int(length) + 1
        return length
    }

    private func reserve(_ more: Int) {
        guard count + more > capacity else { return }
        var grown = capacity * 2
        while grown < count + more { grown *= 2 }
        let bigger = UnsafeMutableRawPointer.allocate(byteCount: grown, alignment: 8)
        bigger.copyMemory(from: base, byteCount: count)
        base.deallocate()
        base = bigger
        capacity = grown
    }

    private func rollBack(to start: Int, _ status: Int32) -> Int32 {
        count = start
        return status
    }

    /// Frame header (7 bytes) and end octet.
    private static let overhead = 8
}
