// The tray app's commands and events. Every command only forwards to the agent controller;
// the types come from the Rust side (bindings.ts is generated from it).
import { invoke } from "@tauri-apps/api/core";
import { listen, type UnlistenFn } from "@tauri-apps/api/event";
import type { Notice, Request, SettingsView, View } from "./bindings";

export type { Notice, Request, SettingsView, View } from "./bindings";

/** The routes of the window: one view each. */
export const ROUTES = ["signin", "enrol", "settings", "status"] as const;
export type Route = (typeof ROUTES)[number];

export const EVENTS = {
  view: "touchgate://view",
  notice: "touchgate://notice",
  navigate: "touchgate://navigate",
} as const;

/** What the window knows about the app besides the view. */
export interface AppInfo {
  version: string;
  log_file: string;
  /** The view the tray last asked for (the window may have loaded after the event). */
  route: Route;
}

/** Sends a request to the controller; rejects with the controller's words. */
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
export const onNotice = (f: (n: Notice) => void): Promise<UnlistenFn> =>
  listen<Notice>(EVENTS.notice, (e) => f(e.payload));
export const onNavigate = (f: (r: Route) => void): Promise<UnlistenFn> =>
  listen<Route>(EVENTS.navigate, (e) => f(e.payload));

/** An error from a command, in words. */
export function words(e: unknown): string {
  if (typeof e === "string") return e;
  if (e instanceof Error) return e.message;
  return JSON.stringify(e);
}
