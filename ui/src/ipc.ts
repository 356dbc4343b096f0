// The tray app's commands and events. Every command only forwards to the agent controller;
// the types, event names and routes come from the Rust side (bindings.ts is generated from it).
import { invoke } from "@tauri-apps/api/core";
import { listen, type UnlistenFn } from "@tauri-apps/api/event";
import { EVENTS, type AppInfo, type ControllerError, type Request, type Route, type SettingsView, type ShownNotice, type View } from "./bindings";

export { ROUTES } from "./bindings";
export type { AppInfo, Notice, Request, Route, SettingsView, ShownNotice, View } from "./bindings";

/** Sends a request to the controller; rejects with a ControllerError (`{ kind, message }`). */
export async function request(req: Request): Promise<void> {
  await invoke("request", { request: req });
}

export const getView = () => invoke<View>("view");
export const getSettings = () => invoke<SettingsView>("settings");
export const getAppInfo = () => invoke<AppInfo>("app_info");
export const openUrl = (url: string) => invoke<void>("open_url", { url });
export const copyText = (text: string) => invoke<void>("copy_text", { text });
export const openLog = () => invoke<void>("open_log");

export const onView = (f: (v: View) => void): Promise<UnlistenFn> =>
  listen<View>(EVENTS.view, (e) => f(e.payload));
export const onNotice = (f: (n: ShownNotice) => void): Promise<UnlistenFn> =>
  listen<ShownNotice>(EVENTS.notice, (e) => f(e.payload));
export const onNavigate = (f: (r: Route) => void): Promise<UnlistenFn> =>
  listen<Route>(EVENTS.navigate, (e) => f(e.payload));

function controllerError(e: unknown): ControllerError | null {
  if (typeof e === "object" && e !== null && "kind" in e && "message" in e) {
    const { kind, message } = e as ControllerError;
    if (typeof kind === "string" && typeof message === "string") return { kind, message };
  }
  return null;
}

/** Whether a command failed because the user cancelled (nothing to say then). */
export function isCancelled(e: unknown): boolean {
  return controllerError(e)?.kind === "cancelled";
}

/** An error from a command, in words. */
export function words(e: unknown): string {
  const c = controllerError(e);
  if (c) return c.message;
  if (typeof e === "string") return e;
  if (e instanceof Error) return e.message;
  return JSON.stringify(e);
}
