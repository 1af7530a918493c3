import ArgumentParser
import Choreo
import ChoreoAMQP
import ChoreoOps
import Foundation

/// Runs `choreo` with Choreo's exit codes: 0 done, 1 the operation failed, 2 a usage error.
/// Errors are one line, never a stack trace.
@main
enum CLIMain {
    static func main() async {
        let command: ParsableCommand
        do {
            command = try ChoreoCommand.parseAsRoot()
        } catch {
            ChoreoCommand.exit(refusedCommandLine: error)
        }
        do {
            try await run(command)
            await OpenConnections.shared.closeAll()
            exit(0)
        } catch {
            await OpenConnections.shared.closeAll()
            fail(error)
        }
    }

    private static func fail(_ error: Error) -> Never {
        if let error = error as? ValidationError {
            printError("error: \(error.message)")
            exit(2)
        }
        if let error = error as? ExitCode { exit(error.rawValue) }
        if let error = error as? OperationError {
            printError("error: \(error.message)")
            exit(1)
        }
        if ChoreoCommand.exitCode(for: error) == .success {
            print(ChoreoCommand.fullMessage(for: error))
            exit(0)
        }
        printError("error: \(error)")
        exit(1)
    }

    private static func run(_ command: ParsableCommand) async throws {
        if var asyncCommand = command as? any AsyncParsableCommand {
            try await asyncCommand.run()
        } else {
            var syncCommand = command
            try syncCommand.run()
        }
    }
}
