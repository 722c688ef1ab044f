// A minimal management console in Java, using only the JDK (11 or later).
//
// It drives secshadow-proxy as a child process the way docs/cli.md describes:
//   * it starts `secshadow-proxy --secret-file - --json --viewer none`,
//   * hands over the shadow secret on the child's standard input (never on argv),
//   * reads the JSON events, one flat object per line, from the child's standard output,
//   * on `listening` connects its own minimal RFB client to the local port: the
//     ProtocolVersion handshake, security type None, ClientInit, then it prints the
//     ServerInit's framebuffer size and name, and disconnects (which ends the session),
//   * maps the proxy's exit code to a message and exits with the same code.
//
// Build and run:
//   javac -d out ShadowConsole.java
//   java -cp out ShadowConsole secret.json                       # runs secshadow-proxy
//   java -cp out ShadowConsole secret.json python3 -m secshadow.cli --device-port 5900
//
// secret.json is {"certificate": "-----BEGIN CERTIFICATE-----...", "password": "...",
// "host": "10.0.0.5", "port": 5900} or the IMI thin-client document as UMS returned it.
// Any further arguments after the proxy command are passed to it.

import java.io.BufferedReader;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Paths;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

public final class ShadowConsole {

    /** The contract's exit codes (docs/cli.md), as a console would show them to its user. */
    static String exitMessage(int code) {
        switch (code) {
            case 0: return "the session ran and ended normally";
            case 1: return "internal error in secshadow-proxy (a bug; see its standard error)";
            case 2: return "usage error: bad flags or a malformed shadow secret";
            case 3: return "the management server (UMS) failed: unreachable, untrusted, login refused or device unknown";
            case 4: return "the device is unreachable (TCP connect failed or timed out)";
            case 5: return "TLS to the device could not be negotiated (old firmware? try --tls-profile legacy)";
            case 6: return "SECURITY: the device did not present the pinned certificate; nothing was sent to it";
            case 7: return "the device rejected the session: wrong or expired one-time password, or the local user refused";
            case 8: return "the viewer could not be started or did not connect in time";
            default: return "unexpected exit code " + code;
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: ShadowConsole SECRET.json [PROXY_COMMAND [ARGS...]]");
            System.exit(2);
        }
        byte[] secret = Files.readAllBytes(Paths.get(args[0]));
        List<String> command = new ArrayList<>();
        if (args.length > 1) {
            for (int i = 1; i < args.length; i++) command.add(args[i]);
        } else {
            command.add("secshadow-proxy");
        }
        command.add("--secret-file");
        command.add("-");
        command.add("--json");
        command.add("--viewer");
        command.add("none");
        System.exit(run(command, secret));
    }

    static int run(List<String> command, byte[] secret) throws IOException, InterruptedException {
        ProcessBuilder builder = new ProcessBuilder(command);
        Process proxy = builder.start();
        // Human-readable progress arrives on the child's standard error: pass it on.
        Thread stderr = pump(proxy.getErrorStream(), "proxy: ");
        try (OutputStream stdin = proxy.getOutputStream()) {
            stdin.write(secret); // the secret goes over the pipe, never on the command line
        } catch (IOException e) {
            // The proxy may have exited early (e.g. a usage error) and closed the pipe.
        }

        Thread viewer = null;
        BufferedReader events = new BufferedReader(
                new InputStreamReader(proxy.getInputStream(), StandardCharsets.UTF_8));
        String line;
        while ((line = events.readLine()) != null) {
            Map<String, Object> event;
            try {
                event = Json.parseObject(line);
            } catch (IllegalArgumentException e) {
                System.out.println("ignoring a line that is not a JSON object: " + e.getMessage());
                continue;
            }
            String name = String.valueOf(event.get("event"));
            switch (name) {
                case "secret":
                    System.out.println("secret from " + event.get("source") + " for device "
                            + event.get("device_host") + ":" + event.get("device_port"));
                    break;
                case "pinned":
                    System.out.println("pinned TLS to the device (" + event.get("tls_version") + ")");
                    break;
                case "listening":
                    String host = (String) event.get("host");
                    int port = ((Number) event.get("port")).intValue();
                    System.out.println("listening on " + host + ":" + port);
                    viewer = new Thread(() -> rfbCheck(host, port), "rfb-check");
                    viewer.start();
                    break;
                case "viewer-connected":
                    System.out.println("viewer connected from " + event.get("peer"));
                    break;
                case "session-started":
                    System.out.println("session started " + event.get("rfb_version"));
                    break;
                case "closed":
                    System.out.println("closed: " + event.get("reason"));
                    break;
                case "error":
                    System.out.println("error " + event.get("code") + ": " + event.get("message"));
                    break;
                default:
                    break; // consumers ignore events they do not know
            }
        }
        int code = proxy.waitFor();
        if (viewer != null) viewer.join(10000);
        stderr.join(2000);
        System.out.println("exit " + code + ": " + exitMessage(code));
        return code;
    }

    /** A minimal RFB 3.8 client: handshake with security type None, read ServerInit, disconnect. */
    static void rfbCheck(String host, int port) {
        try (Socket socket = new Socket()) {
            socket.connect(new InetSocketAddress(host, port), 10000);
            socket.setSoTimeout(30000);
            DataInputStream in = new DataInputStream(socket.getInputStream());
            DataOutputStream out = new DataOutputStream(socket.getOutputStream());
            byte[] version = new byte[12];
            in.readFully(version); // arrives once the device has accepted the one-time password
            String server = new String(version, StandardCharsets.US_ASCII);
            if (!server.startsWith("RFB ")) throw new IOException("not an RFB server: " + server.trim());
            out.write("RFB 003.008\n".getBytes(StandardCharsets.US_ASCII));
            int count = in.readUnsignedByte();
            if (count == 0) throw new IOException("server refused: " + readString(in));
            boolean none = false;
            for (int i = 0; i < count; i++) none |= in.readUnsignedByte() == 1;
            if (!none) throw new IOException("the server does not offer security type None");
            out.write(1);
            int result = in.readInt();
            if (result != 0) throw new IOException("security handshake failed: " + readString(in));
            out.write(1); // ClientInit: shared
            int width = in.readUnsignedShort();
            int height = in.readUnsignedShort();
            in.readFully(new byte[16]); // pixel format
            String desktop = readString(in);
            System.out.println("ServerInit " + width + "x" + height + " \"" + desktop + "\"");
        } catch (IOException e) {
            System.out.println("RFB check failed: " + e.getMessage());
        }
    }

    static String readString(DataInputStream in) throws IOException {
        int length = in.readInt();
        if (length < 0 || length > 1 << 20) throw new IOException("bad string length " + length);
        byte[] data = new byte[length];
        in.readFully(data);
        return new String(data, StandardCharsets.UTF_8);
    }

    static Thread pump(InputStream stream, String prefix) {
        Thread thread = new Thread(() -> {
            try (BufferedReader reader = new BufferedReader(new InputStreamReader(stream, StandardCharsets.UTF_8))) {
                String line;
                while ((line = reader.readLine()) != null) System.err.println(prefix + line);
            } catch (IOException e) {
                // the child is gone
            }
        }, "stderr");
        thread.setDaemon(true);
        thread.start();
        return thread;
    }

    /** Just enough JSON for the proxy's events: one flat object of strings, numbers, booleans and null. */
    static final class Json {
        private final String text;
        private int pos;

        private Json(String text) {
            this.text = text;
        }

        static Map<String, Object> parseObject(String text) {
            Json json = new Json(text);
            json.skipSpace();
            Map<String, Object> object = new LinkedHashMap<>();
            json.expect('{');
            json.skipSpace();
            if (json.peek() == '}') {
                json.pos++;
            } else {
                while (true) {
                    json.skipSpace();
                    String key = json.string();
                    json.skipSpace();
                    json.expect(':');
                    json.skipSpace();
                    object.put(key, json.value());
                    json.skipSpace();
                    char c = json.next();
                    if (c == '}') break;
                    if (c != ',') throw json.error("expected ',' or '}'");
                }
            }
            json.skipSpace();
            if (json.pos != text.length()) throw json.error("trailing characters");
            return object;
        }

        private Object value() {
            char c = peek();
            if (c == '"') return string();
            if (text.startsWith("true", pos)) { pos += 4; return Boolean.TRUE; }
            if (text.startsWith("false", pos)) { pos += 5; return Boolean.FALSE; }
            if (text.startsWith("null", pos)) { pos += 4; return null; }
            int start = pos;
            while (pos < text.length() && "+-0123456789.eE".indexOf(text.charAt(pos)) >= 0) pos++;
            String number = text.substring(start, pos);
            if (number.isEmpty()) throw error("unexpected character");
            if (number.matches("-?\\d+")) return Long.parseLong(number);
            return Double.parseDouble(number);
        }

        private String string() {
            expect('"');
            StringBuilder out = new StringBuilder();
            while (true) {
                char c = next();
                if (c == '"') return out.toString();
                if (c != '\\') { out.append(c); continue; }
                char e = next();
                switch (e) {
                    case '"': case '\\': case '/': out.append(e); break;
                    case 'b': out.append('\b'); break;
                    case 'f': out.append('\f'); break;
                    case 'n': out.append('\n'); break;
                    case 'r': out.append('\r'); break;
                    case 't': out.append('\t'); break;
                    case 'u':
                        if (pos + 4 > text.length()) throw error("short \\u escape");
                        out.append((char) Integer.parseInt(text.substring(pos, pos + 4), 16));
                        pos += 4;
                        break;
                    default: throw error("bad escape");
                }
            }
        }

        private void skipSpace() {
            while (pos < text.length() && Character.isWhitespace(text.charAt(pos))) pos++;
        }

        private char peek() {
            if (pos >= text.length()) throw error("unexpected end");
            return text.charAt(pos);
        }

        private char next() {
            char c = peek();
            pos++;
            return c;
        }

        private void expect(char c) {
            if (next() != c) throw error("expected '" + c + "'");
        }

        private IllegalArgumentException error(String what) {
            return new IllegalArgumentException(what + " at " + pos);
        }
    }
}
