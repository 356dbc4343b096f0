// Test harness, bundled and injected before the app loads: Tauri's IPC is mocked with
// @tauri-apps/api/mocks, commands answer from window.__scenario, and every call is recorded.
import { emit } from "@tauri-apps/api/event";
import { mockIPC, mockWindows } from "@tauri-apps/api/mocks";

interface Scenario {
  view: unknown;
  settings?: unknown;
  /** Request kinds that fail, with the controller's error (`{ kind, message }`). */
  fail?: Record<string, { kind: string; message: string }>;
}

declare global {
  interface Window {
    __scenario: Scenario;
    __calls: { cmd: string; args: Record<string, unknown> }[];
    __emit: (event: string, payload: unknown) => Promise<void>;
  }
}

window.__calls = [];
mockWindows("main");
mockIPC(
  (cmd, args) => {
    const a = JSON.parse(JSON.stringify(args ?? {})) as Record<string, unknown>;
    window.__calls.push({ cmd, args: a });
    const sc = window.__scenario;
    switch (cmd) {
      case "view":
        return sc.view;
      case "settings":
        return sc.settings;
      case "app_info":
        return { version: "0.1.0", log_file: "/home/dev/.local/share/touchgate/logs/desktop.log", route: "status" };
      case "request": {
        const kind = (a.request as { kind: string }).kind;
        const fail = sc.fail?.[kind];
        if (fail) return Promise.reject(fail);
        return null;
      }
      default:
        return null;
    }
  },
  { shouldMockEvents: true },
);
window.__emit = (event, payload) => emit(event, payload);
