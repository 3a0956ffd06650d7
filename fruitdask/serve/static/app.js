// The public page: pick or take a photo, shrink it here (mobile data costs money), send it to
// POST /v1/predict, show the fruit. No external resource, no innerHTML: text only.
"use strict";
(() => {
  const MAX_SIDE = 1024;   // px of the longest side sent: plenty for the model, a few hundred kB
  const QUALITY = 0.85;
  const TOP = 5;
  const T = {
    en: {
      docTitle: "Fruitdask: what is this fruit?", title: "What is this fruit?", switchTo: "Français", switchLang: "fr",
      skip: "Skip to content",
      intro: "Photograph a fruit, or pick a photo: the app tells you what it is, where it comes from and a few words about its diversity.",
      pick: "Take or choose a photo", pickHint: "The photo is shrunk on your phone before it is sent.",
      others: "Other possibilities", footer: "The photo is only used to answer; it is not kept.",
      shrinking: "Preparing the photo…", sending: "Looking at the photo…", done: "Done.",
      family: "Family", genus: "Genus", origin: "Origin", season: "Season in Europe", sources: "Sources: ",
      verySure: "The model is very sure", fairlySure: "The model is fairly sure", notSure: "The model is not sure",
      unknownTitle: "Not a fruit this app knows", maybe: "Perhaps {name}", unknownTip: "Try again with one fruit, close up, in good light.",
      noEntry: "No information about this fruit yet.", none: "none",
      offline: "No network: check your connection, then try again.",
      loading: "The server is still starting: try again in a few seconds.",
      busy: "The server is busy: try again in a moment.",
      tooBig: "This photo is too big to send: choose a smaller one.",
      badPhoto: "This file could not be read as a photo (JPEG or PNG): choose another one.",
      serverError: "The server could not answer: ",
    },
    fr: {
      docTitle: "Fruitdask : quel est ce fruit ?", title: "Quel est ce fruit ?", switchTo: "English", switchLang: "en",
      skip: "Aller au contenu",
      intro: "Photographiez un fruit ou choisissez une photo : l'application vous dit ce que c'est, d'où il vient et quelques mots sur sa diversité.",
      pick: "Prendre ou choisir une photo", pickHint: "La photo est réduite sur votre téléphone avant l'envoi.",
      others: "Autres possibilités", footer: "La photo sert uniquement à répondre ; elle n'est pas conservée.",
      shrinking: "Préparation de la photo…", sending: "Analyse de la photo…", done: "Terminé.",
      family: "Famille", genus: "Genre", origin: "Origine", season: "Saison en Europe", sources: "Sources : ",
      verySure: "Le modèle est très sûr", fairlySure: "Le modèle est assez sûr", notSure: "Le modèle n'est pas sûr",
      unknownTitle: "Pas un fruit que cette application connaît", maybe: "Peut-être : {name}", unknownTip: "Réessayez avec un seul fruit, de près, bien éclairé.",
      noEntry: "Pas encore d'informations sur ce fruit.", none: "aucune",
      offline: "Pas de réseau : vérifiez votre connexion, puis réessayez.",
      loading: "Le serveur démarre encore : réessayez dans quelques secondes.",
      busy: "Le serveur est occupé : réessayez dans un instant.",
      tooBig: "Cette photo est trop lourde pour être envoyée : choisissez-en une plus petite.",
      badPhoto: "Ce fichier n'a pas pu être lu comme une photo (JPEG ou PNG) : choisissez-en un autre.",
      serverError: "Le serveur n'a pas pu répondre : ",
    },
  };
  // The languages, by name: never `code in T` (`?lang=constructor` or `__proto__` are "in"
  // every object, and would show "undefined" and send a lang the server refuses).
  const LANGUAGES = ["en", "fr"];
  const DEFAULT_LANGUAGE = "en";
  const $ = (id) => document.getElementById(id);
  let lang = initialLanguage();
  let lastBlob = null;
  let lastUrl = null;

  function initialLanguage() {
    const wanted = new URLSearchParams(location.search).get("lang");
    if (LANGUAGES.includes(wanted)) return wanted;
    for (const tag of navigator.languages || [navigator.language || ""]) {
      const primary = String(tag).toLowerCase().split("-")[0];
      if (LANGUAGES.includes(primary)) return primary;
    }
    return DEFAULT_LANGUAGE;
  }

  function t(key) { return T[lang][key]; }

  function applyLanguage() {
    document.documentElement.lang = lang;
    document.title = t("docTitle");
    for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    const sw = $("lang-switch");
    sw.textContent = t("switchTo");
    sw.lang = t("switchLang");
  }

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
  }

  async function decodeFile(file) {
    try {
      return await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (e) {
      const img = new Image();
      img.src = URL.createObjectURL(file);
      try { await img.decode(); return img; } finally { URL.revokeObjectURL(img.src); }
    }
  }

  async function shrink(file) {
    const img = await decodeFile(file);
    const w = img.width, h = img.height;
    const scale = Math.min(1, MAX_SIDE / Math.max(w, h));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(w * scale));
    canvas.height = Math.max(1, Math.round(h * scale));
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff";  // transparent PNGs on white, as the server does
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
    return await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", QUALITY));
  }

  function failure(status, body) {
    const code = body && body.error;
    if (status === 503 && code === "loading") return t("loading");
    if (status === 503 || status === 429) return t("busy");
    if (status === 413) return t("tooBig");
    if (status === 400 || status === 415) return t("badPhoto");
    return t("serverError") + (body && body.reason ? body.reason : "HTTP " + status);
  }

  async function predict(blob) {
    const button = $("pick");
    button.disabled = true;
    setStatus(t("sending"));
    try {
      if (navigator.onLine === false) { setStatus(t("offline"), true); return; }
      let resp;
      try {
        resp = await fetch(`/v1/predict?top=${TOP}&lang=${lang}`, {
          method: "POST", headers: { "Content-Type": "image/jpeg" }, body: blob });
      } catch (e) {
        setStatus(t("offline"), true);
        return;
      }
      const body = await resp.json().catch(() => null);
      if (!resp.ok || !body) { setStatus(failure(resp.status, body), true); return; }
      render(body);
      setStatus(t("done"));
    } finally {
      button.disabled = false;
    }
  }

  function confidence(body, p) {
    const pct = new Intl.NumberFormat(lang, { style: "percent" }).format(p);
    if (body.status === "uncertain") return `${body.message} ${t("notSure")} (${pct}).`;
    return `${p >= 0.9 ? t("verySure") : t("fairlySure")} (${pct}).`;
  }

  function fact(dl, key, value) {
    if (!value) return;
    const dt = document.createElement("dt");
    dt.textContent = t(key);
    const dd = document.createElement("dd");
    dd.textContent = value;
    if (key === "family" || key === "genus") dd.lang = "la";
    if (key === "genus") dd.className = "taxon";  // genus names are written in italics, family names not
    dl.append(dt, dd);
  }

  function candidate(p) {
    const li = document.createElement("li");
    const pct = new Intl.NumberFormat(lang, { style: "percent", maximumFractionDigits: 0 }).format(p.probability);
    li.append(document.createTextNode(p.fruit.name));
    if (p.fruit.scientific_name) {
      li.append(document.createTextNode(" "));
      const i = document.createElement("i");
      i.lang = "la";
      i.textContent = `(${p.fruit.scientific_name})`;
      li.append(i);
    }
    li.append(document.createTextNode((lang === "fr" ? " : " : ": ") + pct));
    return li;
  }

  function render(body) {
    const known = body.status !== "unknown";
    const best = body.predictions[0];
    const f = best.fruit;
    const verdict = $("verdict");
    verdict.className = "verdict " + body.status;
    verdict.textContent = known ? confidence(body, best.probability) : body.message;
    $("result").dataset.status = body.status;
    const name = body.status === "uncertain" ? t("maybe").replace("{name}", f.name) : f.name;
    $("fruit-name").textContent = known ? name : t("unknownTitle");
    $("scientific").textContent = known ? (f.scientific_name || "") : "";
    $("scientific").lang = "la";
    const dl = $("facts");
    dl.replaceChildren();
    if (known) {
      fact(dl, "family", f.family);
      fact(dl, "genus", f.genus);
      fact(dl, "origin", f.origin);
      fact(dl, "season", f.season);
    }
    $("note").textContent = known ? (f.note || t("noEntry")) : t("unknownTip");
    const others = known ? body.predictions.slice(1).filter((p) => p.probability >= 0.01) : [];
    $("others").replaceChildren(...others.map(candidate));
    $("others-title").hidden = !others.length;
    $("sources").textContent = known && f.sources && f.sources.length ? t("sources") + f.sources.join(", ") : "";
    $("preview").src = lastUrl;
    $("preview").alt = known ? f.name : t("unknownTitle");
    $("result").hidden = false;
    $("fruit-name").focus();
  }

  async function onPhoto() {
    const file = $("photo").files[0];
    if (!file) return;
    setStatus(t("shrinking"));
    try {
      lastBlob = await shrink(file);
    } catch (e) {
      setStatus(t("badPhoto"), true);
      return;
    }
    if (lastUrl) URL.revokeObjectURL(lastUrl);
    lastUrl = URL.createObjectURL(lastBlob);
    await predict(lastBlob);
    $("photo").value = "";
  }

  document.addEventListener("DOMContentLoaded", () => {
    applyLanguage();
    $("pick").addEventListener("click", () => $("photo").click());
    $("photo").addEventListener("change", onPhoto);
    $("lang-switch").addEventListener("click", () => {
      lang = t("switchLang");
      applyLanguage();
      if (lastBlob && !$("result").hidden) predict(lastBlob);
    });
  });
})();
