import CRabbitMQ
import Foundation
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Everything one connection's I/O thread owns: the rabbitmq-c state, its channels, pending confirms
/// and consumers. Confined to that thread; nothing here is touched from anywhere else.
final class ConnectionCore {
    typealias Completion = @Sendable (Result<Void, AMQPError>) -> Void

    /// A consumer's delivery sink and identity.
    struct ConsumerSink {
        var buffer: DeliveryBuffer
        var channel: AMQPChannel
    }

    final class ChannelState {
        let id: UInt16
        var open = false
        /// Bumped on every reopen: delivery tags of an older generation are meaningless now.
        var generation: UInt64 = 0
        var confirmMode = false
        var prefetch: UInt16?
        var tracker = ConfirmTracker()
        var deliveries = AckCoalescer()
        var completions: [UInt64: Completion] = [:]
        var consumers: [String: ConsumerSink] = [:]
        var closedByClient = false
        let status: ChannelStatus

        init(id: UInt16, status: ChannelStatus) {
            self.id = id
            self.status = status
        }
    }

    let configuration: AMQPConfiguration
    let logger: Logger
    let loop: IOLoop
    private(set) var state: amqp_connection_state_t?
    private(set) var failure: AMQPError?
    private var channels: [UInt16: ChannelState] = [:]
    private var nextChannel: UInt16 = 1
    private var channelMax: UInt16 = 2047
    private var nextToken: UInt64 = 1
    private(set) var negotiatedHeartbeat: Int32 = 0
    /// Publishes are encoded here and written by this process (plain TCP), not by `amqp_basic_publish`.
    private var directWrites: Bool { configuration.tls == nil }
    private let frames = FrameWriter()
    /// Inside ``publishingTogether(_:)``: publishes wait in `frames` for the batch's one write.
    private var batching = false
    /// The previous delivery's header strings, reused when the next one repeats them.
    var recentStrings = RecentStrings()
    /// Called once, on the I/O thread, when the connection ends for any reason.
    var onClose: (@Sendable (AMQPError) -> Void)?
    /// Called on the I/O thread when the broker blocks publishing on this connection (with its reason, such
    /// as "low on disk") and when it lifts the block (nil).
    var onBlocked: (@Sendable (String?) -> Void)?
    /// While the broker blocks publishing here it reads nothing from this connection, a close included.
    var blocked = false

    init(configuration: AMQPConfiguration, logger: Logger, loop: IOLoop) {
        self.configuration = configuration
        self.logger = logger
        self.loop = loop
    }

    // MARK: - Thread body

    /// The I/O thread's body: run jobs, read frames, sleep, until the connection ends. Everything but the
    /// sleep happens under the loop's worker lock (see ``IOLoop``).
    func run() {
        var jobs: [IOLoop.Job] = []
        var settlements: [IOLoop.PendingSettlement] = []
        loop.working { loop.attach(self) }
        turns: while true {
            switch loop.working({ turn(&jobs, &settlements) }) {
            case .again: continue
            case .sleep(let socket): loop.sleep(socket: socket, timeoutMilliseconds: sleepTimeout)
            case .end: break turns
            }
        }
        loop.working {
            loop.attach(nil)
            let reason = failure ?? AMQPError(.closed, message: "connection closed", operation: "connection")
            // Anything still queued or racing in runs against the dead core and fails with the reason.
            for job in loop.finish(reason: reason) { job(self) }
        }
    }

    private enum Turn {
        case again
        case sleep(socket: Int32)
        case end
    }

    /// One turn of the I/O thread: queued settlements and jobs, then the frames that have arrived.
    private func turn(_ jobs: inout [IOLoop.Job], _ settlements: inout [IOLoop.PendingSettlement]) -> Turn {
        loop.takeWork(&jobs, &settlements)
        // Settlements first: an ack handed over before a close job must reach the broker before the close.
        if !settlements.isEmpty {
            apply(settlements)
            settlements.removeAll(keepingCapacity: true)
        }
        if !jobs.isEmpty {
            for job in jobs { job(self) }
            jobs.removeAll(keepingCapacity: true)
        }
        if let due = heldAcksDue, ContinuousClock.now >= due { sendHeldAcks() }
        guard isLive else { return .end }
        readAvailableFrames()
        guard failure == nil, let state = self.state else { return .end }
        if amqp_frames_enqueued(state) != 0 || amqp_data_in_buffer(state) != 0 { return .again }
        return loop.prepareToSleep(ackRoom: heldAckRoom) ? .sleep(socket: amqp_get_sockfd(state)) : .again
    }

    /// For each channel with acks held, how many more it may hold before its count sends them: as many
    /// single acks may wait for the wake-up at `heldAcksDue` (which ``sleepTimeout`` keeps) instead of
    /// waking this thread, since it would only hold them too. The one that reaches the count wakes it.
    private func heldAckRoom(_ room: inout [UInt16: Int]) {
        guard heldAcksDue != nil else { return }
        for channel in channels.values where channel.open {
            guard let hold = channel.deliveries.hold, channel.deliveries.deadline != nil else { continue }
            let left = hold.count - channel.deliveries.heldCount - 1
            if left > 0 { room[channel.id] = left }
        }
    }

    /// Whether a job may run on the thread that submits it while this thread sleeps (``IOLoop/runOrSubmit(_:)``):
    /// over plain TCP, where a publish is one `send` of our own buffer that never waits (see `flushFrames`).
    /// Over TLS rabbitmq-c writes, and may wait for room in the socket, which a caller must not.
    var runsJobsOnCallers: Bool { directWrites && isLive }

    var isLive: Bool { state != nil && failure == nil }

    /// Set while a job runs on a caller's thread: a write that would wait is left to the I/O thread.
    private var onCaller = false

    /// Runs a job on the calling thread, which holds the loop's worker lock.
    func runOnCaller(_ job: IOLoop.Job) {
        onCaller = true
        job(self)
        onCaller = false
    }

    /// Wake often enough that rabbitmq-c sends heartbeats on time (it sends one only inside a call), and
    /// when held acks are due.
    private var sleepTimeout: Int32 {
        let heartbeat: Int32 = negotiatedHeartbeat > 0 ? max(50, negotiatedHeartbeat * 1000 / 4) : 1000
        guard let due = heldAcksDue else { return heartbeat }
        let remaining = due - .now
        if remaining <= .zero { return 0 }
        // Rounded up, so the thread does not wake just before the deadline and sleep again.
        return Int32(min(Double(heartbeat), (remaining / .milliseconds(1)).rounded(.up)))
    }

    private func readAvailableFrames() {
        guard let current = state else { return }
        var state = current
        var budget = 512  // bounded, so queued jobs (acks, publishes) are not starved by a flood of deliveries
        while budget > 0, failure == nil {
            budget -= 1
            var frame = amqp_frame_t()
            var immediately = timeval(tv_sec: 0, tv_usec: 0)
            let status = amqp_simple_wait_frame_noblock(state, &frame, &immediately)
            if status == AMQP_STATUS_TIMEOUT.rawValue { return }
            if status != AMQP_STATUS_OK.rawValue {
                fail(with: Self.error(status: status, operation: "read from \(configuration.address)"))
                return
            }
            handle(frame: frame)
            // Handling may have ended the connection (connection.close from the broker) and freed the state.
            guard failure == nil, let live = self.state else { return }
            state = live
            amqp_maybe_release_buffers_on_channel(state, frame.channel)
            // A job this frame queued (a consumer woken by a delivery) runs before the next read when nothing
            // more is buffered: that read would only find the socket empty, a `recv` and a `poll` on a lone
            // event's path. The socket is read again after the job.
            if amqp_data_in_buffer(state) == 0, amqp_frames_enqueued(state) == 0, loop.hasQueuedJobs { return }
        }
    }

    // MARK: - Connecting

    func connect() throws(AMQPError) {
        let config = configuration
        guard let state = amqp_new_connection() else {
            throw AMQPError(.protocolFailure, message: "out of memory", operation: "connect \(config.address)")
        }
        self.state = state
        do throws(AMQPError) {
            try openSocket(state)
            try login(state)
        } catch {
            amqp_destroy_connection(state)
            self.state = nil
            failure = error
            throw error
        }
        channelMax = UInt16(clamping: amqp_get_channel_max(state) == 0 ? 2047 : amqp_get_channel_max(state))
        negotiatedHeartbeat = amqp_get_heartbeat(state)
        logger.debug("connected", metadata: ["amqp.broker": "\(config)", "amqp.heartbeat": "\(negotiatedHeartbeat)"])
    }

    private func openSocket(_ state: amqp_connection_state_t) throws(AMQPError) {
        let config = configuration
        let operation = "connect \(config.address)"
        let socket: OpaquePointer?
        if let tls = config.tls {
            socket = amqp_ssl_socket_new(state)
            guard let socket else {
                throw AMQPError(.connectionFailed, message: "cannot create a TLS socket", operation: operation)
            }
            if let ca = tls.caFile, amqp_ssl_socket_set_cacert(socket, ca) != AMQP_STATUS_OK.rawValue {
                throw AMQPError(.connectionFailed, message: "cannot load CA file \(ca)", operation: operation)
            }
            if let cert = tls.certificateFile, let key = tls.keyFile,
                amqp_ssl_socket_set_key(socket, cert, key) != AMQP_STATUS_OK.rawValue
            {
                throw AMQPError(
                    .connectionFailed, message: "cannot load client certificate \(cert) and key \(key)",
                    operation: operation)
            }
            amqp_ssl_socket_set_verify_peer(socket, tls.verifyPeer ? 1 : 0)
            amqp_ssl_socket_set_verify_hostname(socket, tls.verifyHostname ? 1 : 0)
        } else {
            socket = amqp_tcp_socket_new(state)
        }
        guard let socket else {
            throw AMQPError(.connectionFailed, message: "cannot create a socket", operation: operation)
        }
        var timeout = Self.timeInterval(config.connectTimeout)
        if config.tls != nil { choreo_tls_clear_errors() }
        let status = amqp_socket_open_noblock(socket, config.host, Int32(config.port), &timeout)
        if status != AMQP_STATUS_OK.rawValue {
            let isTLS = status <= AMQP_STATUS_SSL_ERROR.rawValue && status >= AMQP_STATUS_SSL_CONNECTION_FAILED.rawValue
            let message =
                isTLS
                ? "TLS handshake failed: \(tlsFailure(status: status))"
                : ConnectDiagnosis.reason(host: config.host, port: config.port, timeout: config.connectTimeout)
                    ?? String(cString: amqp_error_string2(status))
            throw AMQPError(.connectionFailed, message: message, operation: operation)
        }
    }

    /// OpenSSL's reason for the handshake's failure, and whether the port is a plain AMQP listener.
    private func tlsFailure(status: Int32) -> String {
        let config = configuration
        switch status {
        case AMQP_STATUS_SSL_PEER_VERIFY_FAILED.rawValue:
            return "the broker's certificate is not signed by a CA this client trusts (name the broker's CA with "
                + "?cacertfile=PATH)"
        case AMQP_STATUS_SSL_HOSTNAME_VERIFY_FAILED.rawValue:
            return "the broker's certificate does not name host '\(config.host)' (connect by a name it holds)"
        default: break
        }
        let reason = choreo_tls_last_reason().map { String(cString: $0) } ?? String(cString: amqp_error_string2(status))
        guard askGreeting() == .amqp091 else { return reason }
        return "\(reason); port \(config.port) is a plain AMQP port, not TLS: use amqp://, or the broker's TLS port"
    }

    /// What the configured address answers to the AMQP 0-9-1 header, asked on a connection of its own after a
    /// failure; waits at most the connect timeout, and 2 s.
    private func askGreeting() -> ConnectDiagnosis.Greeting {
        let config = configuration
        return ConnectDiagnosis.greeting(
            host: config.host, port: config.port, timeout: min(config.connectTimeout, .seconds(2)))
    }

    /// Why the server at the configured address sent no `connection.start`, if it is not an AMQP 0-9-1 broker:
    /// a TLS port reached with amqp://, another protocol, another AMQP version. Nil for a broker that closed the
    /// connection at login (or cannot be reached again to ask).
    private func notABroker(timedOut: Bool) -> String? {
        let config = configuration
        let server = "the server at \(config.address)"
        let port =
            [5671, 5672].contains(config.port)
            ? "another service holds RabbitMQ's port \(config.port)"
            : "is \(config.port) the broker's AMQP port? RabbitMQ's is 5672, or 5671 for amqps://"
        switch timedOut ? .silent : askGreeting() {
        case .tls: return "\(server) speaks TLS: connect with amqps://"
        case .otherAMQP(let version):
            return "\(server) speaks AMQP \(version), not 0-9-1: Choreo needs RabbitMQ or another AMQP 0-9-1 broker"
        case .text(let line): return "\(server) does not speak AMQP 0-9-1: it answered '\(line)' (\(port))"
        case .unknown, .closed:
            return "\(server) does not speak AMQP 0-9-1: it closed the connection without a broker's greeting (\(port))"
        case .silent: return "no AMQP 0-9-1 greeting from \(server) within \(config.connectTimeout) (\(port))"
        case .amqp091, .unreachable: return nil
        }
    }

    private func login(_ state: amqp_connection_state_t) throws(AMQPError) {
        let config = configuration
        var handshake = Self.timeInterval(config.connectTimeout)
        _ = amqp_set_handshake_timeout(state, &handshake)
        var rpc = Self.timeInterval(config.requestTimeout)
        _ = amqp_set_rpc_timeout(state, &rpc)
        let arena = CArena()
        let capabilities: AMQPTable = [
            "publisher_confirms": true, "consumer_cancel_notify": true, "connection.blocked": true,
            "basic.nack": true, "authentication_failure_close": true, "exchange_exchange_bindings": true,
        ]
        var properties: AMQPTable = [
            "product": "Choreo", "platform": "Swift", "capabilities": .table(capabilities),
        ]
        if let name = config.connectionName { properties["connection_name"] = .string(name) }
        let table: amqp_table_t
        do { table = try arena.table(properties) } catch { throw error as! AMQPError }
        let heartbeat = Int32(config.heartbeat.components.seconds)
        let reply = withUnsafePointer(to: table) { tablePointer in
            choreo_amqp_login_plain(
                state, config.virtualHost, Int32(2047), Int32(config.frameMax), heartbeat, tablePointer,
                config.username, config.password)
        }
        if var error = Self.error(reply: reply, operation: "log in to \(config) ") {
            error.operation = "log in to \(config)"
            if error.replyCode == AMQPError.ReplyCode.accessRefused {
                error.code = .authenticationFailed
                error.message =
                    "ACCESS_REFUSED: the broker refused user '\(config.username)' (wrong user name or password)"
            } else if error.replyCode == AMQPError.ReplyCode.invalidPath
                || error.replyCode == AMQPError.ReplyCode.notAllowed
            {
                error.message =
                    "\(error.message) (does vhost '\(config.virtualHost)' exist, and may '\(config.username)' use it?)"
            } else if reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION,
                amqp_get_server_properties(state).pointee.num_entries == 0,
                let reason = notABroker(timedOut: error.code == .timeout)
            {
                // No connection.start came: the login never began, so the user name is not the question.
                error.code = .connectionFailed
                error.operation = "connect \(config.address)"
                error.message = reason
            } else if error.code == .connectionLost {
                error.code = .authenticationFailed
                error.message = "the broker closed the connection during login (wrong credentials or vhost?)"
            }
            if reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION { sendConnectionCloseOK() }
            throw error
        }
    }

    // MARK: - Channels

    func channelState(_ id: UInt16) throws(AMQPError) -> ChannelState {
        if let failure { throw failure }
        guard let channel = channels[id], !channel.closedByClient else {
            throw AMQPError(.closed, message: "channel \(id) is closed", operation: "channel \(id)")
        }
        if !channel.open { try reopen(channel) }
        return channel
    }

    func openChannel(status: ChannelStatus) throws(AMQPError) -> UInt16 {
        if let failure { throw failure }
        var id = nextChannel
        var tries = 0
        while channels[id] != nil {
            id = id >= channelMax ? 1 : id + 1
            tries += 1
            if tries > Int(channelMax) {
                throw AMQPError(
                    .protocolFailure, message: "all \(channelMax) channels are in use", operation: "channel.open")
            }
        }
        nextChannel = id >= channelMax ? 1 : id + 1
        let channel = ChannelState(id: id, status: status)
        channels[id] = channel
        do throws(AMQPError) {
            try reopen(channel)
        } catch {
            channels[id] = nil
            throw error
        }
        return id
    }

    /// Opens (or reopens after a broker-side close) the channel and restores its modes.
    private func reopen(_ channel: ChannelState) throws(AMQPError) {
        let state = try liveState()
        _ = amqp_channel_open(state, channel.id)
        try check("channel.open \(channel.id)", channel: channel.id)
        channel.open = true
        channel.generation += 1
        channel.tracker = ConfirmTracker()
        channel.deliveries.reset()
        channel.status.opened(generation: channel.generation)
        if channel.confirmMode {
            _ = amqp_confirm_select(state, channel.id)
            try check("confirm.select", channel: channel.id)
        }
        if let prefetch = channel.prefetch {
            _ = amqp_basic_qos(state, channel.id, 0, prefetch, 0)
            try check("basic.qos", channel: channel.id)
        }
    }

    func closeChannel(_ id: UInt16) throws(AMQPError) {
        guard let channel = channels[id] else { return }
        channel.closedByClient = true
        defer { channels[id] = nil }
        let reason = AMQPError(.closed, message: "channel \(id) was closed", operation: "channel.close")
        let wasOpen = channel.open
        // Held acks first: the close would give their deliveries back to the queue.
        if wasOpen { _ = send(channel.deliveries.flushHeld(force: true), on: id) }
        abandon(channel, reason: reason)
        guard wasOpen, let state, failure == nil else { return }
        let reply = amqp_channel_close(state, id, Int32(AMQP_REPLY_SUCCESS))
        if let error = Self.error(reply: reply, operation: "channel.close \(id)") {
            if error.code == .connectionLost || error.code == .connectionClosed || error.code == .timeout {
                fail(with: error)
            }
        }
    }

    func generation(of id: UInt16) -> UInt64 { channels[id]?.generation ?? 0 }

    /// The channel when it exists and is open, without reopening it.
    func channelStateIfOpen(_ id: UInt16) throws(AMQPError) -> ChannelState {
        guard let channel = channels[id], channel.open else {
            throw AMQPError(.closed, message: "channel \(id) is not open", operation: "channel \(id)")
        }
        return channel
    }

    /// Records a broker-side channel close: pending work fails, the next use reopens the channel.
    func markChannelClosed(_ id: UInt16, reason: AMQPError) {
        guard let channel = channels[id] else { return }
        abandon(channel, reason: reason)
    }

    /// Sets confirm mode on the channel; it stays on across reopens.
    func enableConfirms(_ id: UInt16) throws(AMQPError) {
        let channel = try channelState(id)
        guard !channel.confirmMode else { return }
        _ = amqp_confirm_select(try liveState(), id)
        try check("confirm.select", channel: id)
        channel.confirmMode = true
    }

    func setPrefetch(_ id: UInt16, count: UInt16) throws(AMQPError) {
        let channel = try channelState(id)
        _ = amqp_basic_qos(try liveState(), id, 0, count, 0)
        try check("basic.qos \(count)", channel: id)
        channel.prefetch = count
    }

    // MARK: - Publishing

    /// Runs `body`, which publishes several messages, so that they leave together. Over plain TCP their
    /// frames go into one buffer, written with one send() at the end. Over TLS rabbitmq-c sends every frame
    /// itself, with its own send(), and the socket is corked: otherwise each message would leave as its
    /// own TCP segment, which costs this process and the broker a wake-up and a read per message.
    func publishingTogether(_ body: () -> Void) {
        guard let state else { return body() }
        if directWrites {
            batching = true
            body()
            batching = false
            flushFrames()
            return
        }
        let fd = amqp_get_sockfd(state)
        guard fd >= 0 else { return body() }
        var on: Int32 = 1
        let size = socklen_t(MemoryLayout<Int32>.size)
        let didCork = setsockopt(fd, Int32(IPPROTO_TCP), TCP_CORK, &on, size) == 0
        body()
        if didCork {
            var off: Int32 = 0
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_CORK, &off, size)
        }
    }

    /// Writes the publishes encoded so far; a socket that fails ends the connection. On a caller's thread
    /// (``runOnCaller(_:)``) a socket without room keeps the rest, and the I/O thread writes it, waiting.
    private func flushFrames() {
        guard !frames.isEmpty else { return }
        guard let state else {
            frames.discard()  // the connection is gone; those publishes' completions failed with it
            return
        }
        switch frames.flush(to: amqp_get_sockfd(state), waiting: !onCaller) {
        case .written: break
        case .wouldWait:
            loop.writesLeftToThread.add(1, ordering: .relaxed)
            loop.submit { core in core.flushFrames() }
        case .failed(let code):
            let reason = String(cString: strerror(code))
            fail(with: AMQPError(.connectionLost, message: "connection lost (\(reason))", operation: "basic.publish"))
        }
    }

    /// Publishes one message. With confirms on, `completion` runs when the broker settles it; else at once.
    ///
    /// `arena` holds the encoded properties until the call returns; a batch shares one per chunk.
    func publish(_ message: AMQPOutgoingMessage, channel id: UInt16, arena: CArena, completion: @escaping Completion) {
        let channel: ChannelState
        let state: amqp_connection_state_t
        do throws(AMQPError) {
            channel = try channelState(id)
            state = try liveState()
        } catch {
            completion(.failure(error))
            return
        }
        let status: Int32
        do {
            let (properties, exchange, routingKey) = try arena.publishFields(message)
            var props = properties
            status = message.body.withUnsafeBytes { raw -> Int32 in
                if directWrites {
                    return frames.appendPublish(
                        channel: id, exchange: exchange, routingKey: routingKey, mandatory: message.mandatory,
                        properties: &props, body: raw, frameMax: Int(amqp_get_frame_max(state)))
                }
                let body = amqp_bytes_t(len: raw.count, bytes: UnsafeMutableRawPointer(mutating: raw.baseAddress))
                return amqp_basic_publish(state, id, exchange, routingKey, message.mandatory ? 1 : 0, 0, &props, body)
            }
        } catch {
            completion(.failure(error as! AMQPError))
            return
        }
        guard status == AMQP_STATUS_OK.rawValue else {
            let error = Self.error(status: status, operation: Self.publishOperation(message))
            completion(.failure(error))
            if status != AMQP_STATUS_TABLE_TOO_BIG.rawValue && status != AMQP_STATUS_BAD_AMQP_DATA.rawValue {
                fail(with: error)
            }
            return
        }
        guard channel.confirmMode else {
            // Written before it is reported sent, batch or not (batches are for confirmed publishes).
            if directWrites { flushFrames() }
            completion(failure.map { .failure($0) } ?? .success(()))
            return
        }
        let token = nextToken
        nextToken += 1
        _ = channel.tracker.published(
            token: token, mandatory: message.mandatory,
            exchange: message.exchange, routingKey: message.routingKey)
        channel.completions[token] = { result in
            completion(
                result.mapError { error in
                    var e = error
                    if e.operation.isEmpty { e.operation = Self.publishOperation(message) }
                    return e
                })
        }
        // A failed write ends the connection, which fails the completion just registered.
        if !batching { flushFrames() }
    }

    private static func publishOperation(_ message: AMQPOutgoingMessage) -> String {
        "basic.publish to exchange '\(message.exchange)' with routing key '\(message.routingKey)'"
    }

    // MARK: - Synchronous requests

    /// Runs a synchronous rabbitmq-c request on a channel and maps its reply.
    func request<T>(_ operation: String, channel id: UInt16, _ body: (amqp_connection_state_t) -> T) throws(AMQPError)
        -> T
    {
        _ = try channelState(id)
        let result = body(try liveState())
        try check(operation, channel: id)
        return result
    }

    func addConsumer(tag: String, channel id: UInt16, sink: ConsumerSink) {
        channels[id]?.consumers[tag] = sink
    }

    func removeConsumer(tag: String, channel id: UInt16) -> ConsumerSink? {
        channels[id]?.consumers.removeValue(forKey: tag)
    }

    /// Sends the acks, nacks and rejects that arrived since the last wake-up, coalesced per channel
    /// (acks may be held: ``AMQPChannel/holdAcks(for:upTo:)``).
    private func apply(_ settlements: [IOLoop.PendingSettlement]) {
        guard failure == nil else { return }
        var order: [UInt16] = []
        var byChannel: [UInt16: [AckCoalescer.Settlement]] = [:]
        for p in settlements {
            guard let channel = channels[p.channel], channel.open else { continue }
            if let g = p.generation, g != channel.generation { continue }  // stale: the broker requeued it already
            if byChannel[p.channel] == nil { order.append(p.channel) }
            byChannel[p.channel, default: []].append(p.settlement)
        }
        let now = ContinuousClock.now
        for id in order {
            guard let channel = channels[id] else { continue }
            guard send(channel.deliveries.settle(byChannel[id]!, now: now), on: id) else { return }
        }
        noteHeldAcks()
    }

    /// The earliest time held acks must go out, over all channels; nil when none are held.
    private var heldAcksDue: ContinuousClock.Instant?

    private func noteHeldAcks() {
        heldAcksDue = channels.values.lazy.compactMap { $0.deliveries.deadline }.min()
    }

    /// Sends the held acks that are due, or with `force` all of them (before a close).
    private func sendHeldAcks(force: Bool = false) {
        guard heldAcksDue != nil else { return }
        let now = ContinuousClock.now
        for channel in channels.values where channel.open {
            guard send(channel.deliveries.flushHeld(now: now, force: force), on: channel.id) else { return }
        }
        noteHeldAcks()
    }

    /// Writes settlement frames; false when the connection failed doing so.
    private func send(_ frames: [AckCoalescer.Frame], on id: UInt16) -> Bool {
        guard let state, failure == nil else { return false }
        for frame in frames {
            let status: Int32
            switch frame {
            case .ack(let tag, let multiple):
                status = amqp_basic_ack(state, id, tag, multiple ? 1 : 0)
            case .nack(let tag, let multiple, let requeue):
                status = amqp_basic_nack(state, id, tag, multiple ? 1 : 0, requeue ? 1 : 0)
            case .reject(let tag, let requeue):
                status = amqp_basic_reject(state, id, tag, requeue ? 1 : 0)
            }
            if status != AMQP_STATUS_OK.rawValue {
                fail(with: Self.error(status: status, operation: "settle delivery \(frame)"))
                return false
            }
        }
        return true
    }

    /// Sets how long and how many of a channel's acks may wait to go out together; nil sends each at once.
    /// Acks already held go out now.
    func holdAcks(_ id: UInt16, _ hold: AckCoalescer.Hold?) throws(AMQPError) {
        let channel = try channelState(id)  // open, or reopened
        if !send(channel.deliveries.flushHeld(force: true), on: id) { _ = try liveState() }  // throws the failure
        channel.deliveries.hold = hold
        noteHeldAcks()
    }

    // MARK: - Closing

    func close() {
        // Held acks first: the close would give their deliveries back to the queue.
        sendHeldAcks(force: true)
        guard let state, failure == nil else { return }
        let reason = AMQPError(.closed, message: "the connection was closed", operation: "connection")
        for channel in channels.values { abandon(channel, reason: reason) }
        if blocked {
            // A resource alarm: the broker would read neither the close nor anything before it until the alarm
            // clears, so the close would wait out the request timeout. Closing the socket gives the broker the
            // same news (its unacknowledged deliveries go back to their queues) at once.
            logger.debug("closing without connection.close: the broker blocks this connection")
            finishFailure(reason)
            return
        }
        let reply = amqp_connection_close(state, Int32(AMQP_REPLY_SUCCESS))
        if let error = Self.error(reply: reply, operation: "connection.close") {
            logger.debug("connection.close did not complete cleanly", metadata: ["amqp.error": "\(error)"])
        }
        finishFailure(reason)
    }

    /// Ends the connection with an error: every pending confirm and consumer fails with it.
    func fail(with error: AMQPError) {
        guard failure == nil else { return }
        logger.debug("connection failed", metadata: ["amqp.error": "\(error)"])
        for channel in channels.values { abandon(channel, reason: error) }
        finishFailure(error)
    }

    private func finishFailure(_ error: AMQPError) {
        failure = error
        channels.removeAll()
        if let state {
            amqp_destroy_connection(state)
            self.state = nil
        }
        onClose?(error)
        onClose = nil
    }

    private func abandon(_ channel: ChannelState, reason: AMQPError) {
        for token in channel.tracker.abandonAll() {
            channel.completions.removeValue(forKey: token)?(.failure(reason))
        }
        for completion in channel.completions.values { completion(.failure(reason)) }
        channel.completions.removeAll()
        for sink in channel.consumers.values { sink.buffer.finish(throwing: reason) }
        channel.consumers.removeAll()
        channel.open = false
        channel.status.closed()
        // Its deliveries went back to the queue: held acks of them mean nothing now.
        channel.deliveries.reset()
        noteHeldAcks()
    }

    // MARK: - Helpers

    func liveState() throws(AMQPError) -> amqp_connection_state_t {
        if let failure { throw failure }
        guard let state else { throw AMQPError(.closed, message: "not connected", operation: "connection") }
        return state
    }

    /// Checks the reply of the last synchronous request; a channel error recovers the channel,
    /// a connection error ends the connection.
    private func check(_ operation: String, channel id: UInt16) throws(AMQPError) {
        let state = try liveState()
        let reply = amqp_get_rpc_reply(state)
        guard let error = Self.error(reply: reply, operation: operation) else { return }
        if error.code == .channelClosed {
            sendChannelCloseOK(id)
            if let channel = channels[id] { abandon(channel, reason: error) }
        } else {
            if reply.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION { sendConnectionCloseOK() }
            fail(with: error)
        }
        throw error
    }

    private func sendChannelCloseOK(_ id: UInt16) {
        guard let state else { return }
        var ok = amqp_channel_close_ok_t(dummy: 0)
        _ = amqp_send_method(state, id, CHOREO_CHANNEL_CLOSE_OK, &ok)
    }

    private func sendConnectionCloseOK() {
        guard let state else { return }
        var ok = amqp_connection_close_ok_t(dummy: 0)
        _ = amqp_send_method(state, 0, CHOREO_CONNECTION_CLOSE_OK, &ok)
    }

    static func timeInterval(_ d: Duration) -> timeval {
        let (s, atto) = d.components
        return Glibc.timeval(tv_sec: Int(s), tv_usec: Int(atto / 1_000_000_000_000))
    }

    static func error(status: Int32, operation: String) -> AMQPError {
        let text = String(cString: amqp_error_string2(status))
        switch status {
        case AMQP_STATUS_TIMEOUT.rawValue:
            return AMQPError(.timeout, message: "the broker did not answer in time", operation: operation)
        case AMQP_STATUS_HEARTBEAT_TIMEOUT.rawValue:
            return AMQPError(
                .connectionLost, message: "heartbeat timeout: the broker stopped answering", operation: operation)
        case AMQP_STATUS_CONNECTION_CLOSED.rawValue, AMQP_STATUS_SOCKET_ERROR.rawValue,
            AMQP_STATUS_SOCKET_CLOSED.rawValue,
            AMQP_STATUS_SSL_ERROR.rawValue:
            return AMQPError(.connectionLost, message: "connection lost (\(text))", operation: operation)
        case AMQP_STATUS_TABLE_TOO_BIG.rawValue:
            return AMQPError(.invalidArgument, message: "headers too large for one frame", operation: operation)
        default:
            return AMQPError(.protocolFailure, message: text, operation: operation)
        }
    }

    static func error(reply: amqp_rpc_reply_t, operation: String) -> AMQPError? {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return nil
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            return error(status: reply.library_error, operation: operation)
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            let method = reply.reply
            if method.id == CHOREO_CONNECTION_CLOSE, let decoded = method.decoded {
                let close = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
                return AMQPError(
                    .connectionClosed, replyCode: close.reply_code, message: CDecode.string(close.reply_text),
                    operation: operation)
            }
            if method.id == CHOREO_CHANNEL_CLOSE, let decoded = method.decoded {
                let close = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                return AMQPError(
                    .channelClosed, replyCode: close.reply_code, message: CDecode.string(close.reply_text),
                    operation: operation)
            }
            return AMQPError(.protocolFailure, message: "unexpected reply method \(method.id)", operation: operation)
        default:
            return AMQPError(.protocolFailure, message: "missing reply", operation: operation)
        }
    }
}
